"""The `rmt_lm` model's config: the Transformer-XL backbone's flags (memory, per-sample recurrence and what the model
records are shared with the other families: models/config.py), their checks, and the defaults an older checkpoint's
config lacks.
"""

import logging
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import ChoiceEnum
from omegaconf import II

from rmt_fairseq.errors import check
from rmt_fairseq.models.config import (
    MemoryConfig,
    SegmentConfig,
    TrainedWithConfig,
    check_cutoffs,
    cutoffs_of,
    validate_memory,
)

logger = logging.getLogger(__name__)

INIT_SCHEMES = ChoiceEnum(["fairseq", "normal", "uniform"])
EMBEDDING_IMPLS = ChoiceEnum(["fairseq", "transformer_xl"])


@dataclass
class RMTLanguageModelConfig(MemoryConfig, SegmentConfig, TrainedWithConfig):
    """rmt_lm's flags: the Transformer-XL backbone; memory, per-sample recurrence and provenance are shared
    (models/config.py)."""

    decoder_layers: int = field(default=16, metadata={"help": "number of decoder layers"})
    decoder_embed_dim: int = field(default=410, metadata={"help": "model dimension C"})
    decoder_ffn_embed_dim: int = field(default=2100, metadata={"help": "feed-forward inner dimension"})
    decoder_attention_heads: int = field(default=10, metadata={"help": "attention heads (C must divide by it)"})
    decoder_head_dim: Optional[int] = field(
        default=None, metadata={"help": "per-head dimension (Transformer-XL's d_head; default: C / heads)"}
    )
    dropout: float = field(default=0.1, metadata={"help": "dropout on embeddings, relative position embeddings, "
                                                   "residual branches and the output (Transformer-XL's --dropout)"})
    attention_dropout: float = field(default=0.0, metadata={"help": "dropout on attention weights (XL's --dropatt)"})
    activation_dropout: float = field(
        default=0.0, metadata={"help": "dropout after the feed-forward block's ReLU (Transformer-XL uses --dropout "
                               "there: the paper presets set it equal to --dropout)"})
    no_memory_dropout: bool = field(
        default=False,
        metadata={"help": "do not apply --dropout to memory tokens (LM-RMT applies it: read memory joins the embedding "
                  "dropout, written memory is taken after the output dropout)"},
    )
    read_mem_from_cache: Optional[bool] = field(
        default=False,
        metadata={"help": "read and write memory tokens attend to the XL cache (LM-RMT's --read_mem_from_cache; off: "
                  "only segment tokens see the cache)"},
    )
    same_length: bool = field(
        default=False,
        metadata={"help": "every segment token attends the same number of tokens: the --mem-len before it and itself "
                  "(Transformer-XL's --same_length; needs --mem-len > 0; an evaluation option in XL's scripts, set "
                  "with --model-overrides)"},
    )
    clamp_len: int = field(
        default=-1,
        metadata={"help": "relative distances above this use the position embedding of this distance "
                  "(Transformer-XL's --clamp_len; <= 0: off)"},
    )
    init: INIT_SCHEMES = field(
        default="fairseq",
        metadata={"help": "initialisation: fairseq (PyTorch's Linear default, embeddings N(0, C^-0.5), u/v zero), or "
                  "Transformer-XL's `weights_init`: normal (weights, embeddings, u/v N(0, --init-std), LayerNorm "
                  "N(1, --init-std), projections N(0, --proj-init-std), biases 0) or uniform (U(-init_range, "
                  "init_range) instead of N(0, init_std))"},
    )
    init_std: float = field(default=0.02, metadata={"help": "--init normal: std of weights (XL's --init_std)"})
    init_range: float = field(default=0.1, metadata={"help": "--init uniform: bound (XL's --init_range)"})
    proj_init_std: float = field(
        default=0.01, metadata={"help": "--init normal/uniform: std of adaptive projections (XL's --proj_init_std)"}
    )
    embedding_impl: EMBEDDING_IMPLS = field(
        default="fairseq",
        metadata={"help": "input embedding and output softmax: fairseq (nn.Embedding / fairseq's AdaptiveInput and "
                  "AdaptiveSoftmax; a bias-free output layer) or transformer_xl (XL's AdaptiveEmbedding and "
                  "ProjectedAdaptiveLogSoftmax: bands of C / --div-val^i, projections only where a band's "
                  "dimension differs from C, output biases; cutoffs from --adaptive-softmax-cutoff, weights tied "
                  "with --tie-adaptive-weights or --share-decoder-input-output-embed, projections with "
                  "--tie-adaptive-proj)"},
    )
    div_val: int = field(
        default=1, metadata={"help": "--embedding-impl transformer_xl: band i has dimension C / div_val^i "
                             "(Transformer-XL's --div_val)"}
    )
    mem_len: int = field(
        default=0, metadata={"help": "Transformer-XL cache length L (detached per-layer states); 0 = none"}
    )
    checkpoint_activations: bool = field(
        default=False,
        metadata={"help": "recompute each layer's activations in backward (torch non-reentrant checkpoint: the "
                  "kind that works under ZeRO-2/3 with weights shared across segments)"},
    )
    share_decoder_input_output_embed: bool = field(
        default=False, metadata={"help": "tie input embedding and output projection"}
    )
    no_scale_embedding: bool = field(default=False, metadata={"help": "do not multiply embeddings by sqrt(C)"})
    adaptive_softmax_cutoff: Optional[str] = field(
        default=None, metadata={"help": "comma-separated adaptive softmax cutoffs, e.g. 20000,40000,200000"}
    )
    adaptive_softmax_dropout: float = field(default=0.0, metadata={"help": "dropout in adaptive softmax tails"})
    adaptive_softmax_factor: float = field(default=4.0, metadata={"help": "adaptive softmax dimension factor"})
    adaptive_input: bool = field(default=False, metadata={"help": "use fairseq's AdaptiveInput embeddings"})
    adaptive_input_factor: float = field(default=4.0, metadata={"help": "adaptive input dimension factor"})
    adaptive_input_cutoff: Optional[str] = field(
        default=None, metadata={"help": "adaptive input cutoffs (default: the adaptive softmax cutoffs)"}
    )
    tie_adaptive_weights: bool = field(
        default=False, metadata={"help": "tie adaptive input and adaptive softmax weights"}
    )
    tie_adaptive_proj: bool = field(
        default=False, metadata={"help": "also tie the adaptive input/softmax projections"}
    )
    tokens_per_sample: Optional[int] = II("task.tokens_per_sample")



def validate_config(cfg, vocab_size: int) -> None:
    """Stop before training on a flag that cannot work, naming the flag and its value."""
    for flag, value, low in [
        ("--mem-len", cfg.mem_len, 0),
        ("--decoder-layers", cfg.decoder_layers, 1),
        ("--decoder-embed-dim", cfg.decoder_embed_dim, 1),
        ("--decoder-ffn-embed-dim", cfg.decoder_ffn_embed_dim, 1),
        ("--decoder-attention-heads", cfg.decoder_attention_heads, 1),
    ]:
        check(value >= low, f"{flag} must be >= {low}, got {value}")
    for flag, value in [("--dropout", cfg.dropout), ("--attention-dropout", cfg.attention_dropout),
                        ("--activation-dropout", cfg.activation_dropout)]:
        check(0.0 <= value < 1.0, f"{flag} must be in [0, 1), got {value}")
    if cfg.decoder_head_dim is not None:
        check(cfg.decoder_head_dim >= 1, f"--decoder-head-dim must be >= 1, got {cfg.decoder_head_dim}")
    check(cfg.decoder_head_dim is not None or cfg.decoder_embed_dim % cfg.decoder_attention_heads == 0,
          f"--decoder-embed-dim {cfg.decoder_embed_dim} is not divisible by --decoder-attention-heads "
          f"{cfg.decoder_attention_heads} (or set --decoder-head-dim)")
    check_cutoffs(cfg, vocab_size, [("--adaptive-softmax-cutoff", cfg.adaptive_softmax_cutoff),
                                    ("--adaptive-input-cutoff", cfg.adaptive_input_cutoff)])
    xl = str(cfg.embedding_impl) == "transformer_xl"
    if cfg.share_decoder_input_output_embed and cfg.adaptive_softmax_cutoff is not None and not xl:
        logger.warning("--share-decoder-input-output-embed is ignored with --adaptive-softmax-cutoff "
                       "(tie adaptive input and softmax with --tie-adaptive-weights)")
    if cfg.tie_adaptive_weights and not xl:
        check(cfg.adaptive_input and cfg.adaptive_softmax_cutoff is not None,
              "--tie-adaptive-weights needs --adaptive-input and --adaptive-softmax-cutoff")
    check(cfg.div_val >= 1, f"--div-val must be >= 1, got {cfg.div_val}")
    check(cfg.div_val == 1 or xl, f"--div-val {cfg.div_val} needs --embedding-impl transformer_xl (fairseq's "
                                  f"adaptive modules take --adaptive-input-factor / --adaptive-softmax-factor)")
    if xl and cfg.adaptive_input_cutoff is not None:
        check(cfg.adaptive_input_cutoff == cfg.adaptive_softmax_cutoff,
              f"--adaptive-input-cutoff {cfg.adaptive_input_cutoff} differs from --adaptive-softmax-cutoff "
              f"{cfg.adaptive_softmax_cutoff}: --embedding-impl transformer_xl cuts input and output at the same "
              f"cutoffs (Transformer-XL's)")
    if xl and cfg.adaptive_softmax_cutoff is not None and cfg.div_val > 1:
        cut = cutoffs_of(cfg)
        check(cfg.decoder_embed_dim // cfg.div_val ** len(cut) >= 1,
              f"--div-val {cfg.div_val}: the last of {len(cut) + 1} bands would have dimension "
              f"{cfg.decoder_embed_dim} // {cfg.div_val}^{len(cut)} = 0; use a smaller --div-val")
    check(str(cfg.init) in ("fairseq", "normal", "uniform"),
          f"--init must be fairseq, normal or uniform, got {cfg.init}")
    for flag, value in [("--init-std", cfg.init_std), ("--init-range", cfg.init_range),
                        ("--proj-init-std", cfg.proj_init_std)]:
        check(value > 0, f"{flag} must be > 0, got {value}")
    if cfg.read_mem_from_cache and (cfg.mem_tokens == 0 or cfg.mem_len == 0):
        logger.warning("--read-mem-from-cache has no effect with --mem-tokens %d --mem-len %d: it lets memory tokens "
                       "see the XL cache, so it needs both", cfg.mem_tokens, cfg.mem_len)
    validate_memory(cfg)
    check(not cfg.same_length or cfg.mem_len > 0,
          f"--same-length needs --mem-len > 0 (every token attends the --mem-len tokens before it and itself, "
          f"Transformer-XL's rule), got --mem-len {cfg.mem_len}")
