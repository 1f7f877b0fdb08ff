"""The `rmt_lm` model: a Transformer-XL decoder with RMT memory tokens, an XL cache, both, or neither.

Legend: B batch (streams), T segment tokens, M memory tokens, L XL-cache length, C model dim, V vocabulary.

Memory modes, all from flags on the same backbone:
  --mem-tokens 0 --mem-len 0      no memory (the baseline)
  --mem-len L                     Transformer-XL: per-layer hidden states of the last L tokens, detached
  --mem-tokens M                  RMT: [read mem | segment | write mem]; write output -> next read memory
  --mem-tokens M --mem-len L      RMT + XL cache
  --memory-layout mt              the paper's MT ablation: memory tokens at the start only, no recurrence
  --mem-tokens M --associative-memory
                                  ARMT (Rodkin et al. 2024): [segment | write mem]; per layer an associative
                                  matrix written by the memory tokens, read by every token of the next segment
                                  (modules/associative.py); memory tokens are learned, not carried
"""

import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from fairseq import options
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import FairseqIncrementalDecoder, FairseqLanguageModel, register_model, register_model_architecture
from fairseq.modules import AdaptiveSoftmax
from omegaconf import II, OmegaConf, open_dict
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from rmt_fairseq import threads
from rmt_fairseq.compat import eval_context_window
from rmt_fairseq.errors import RMTConfigError, check
from rmt_fairseq.modules import associative
from rmt_fairseq.modules.adaptive import DenseAdaptiveInput, adaptive_softmax_nll
from rmt_fairseq.modules.memory import HasMemoryTokens, Layout, LayoutCache, MemoryTokens
from rmt_fairseq.modules.recurrence import (
    DEFAULT_SEGMENT_LEN,
    SCHEDULES,
    RecurrentState,
    SegmentOutput,
    run_segments,
    stack_layers,
)
from rmt_fairseq.modules.relative_attention import PositionBias, RelativeDecoderLayer
from rmt_fairseq.modules.transformer_xl import XLAdaptiveEmbedding, XLAdaptiveLogSoftmax, init_transformer_xl_

logger = logging.getLogger(__name__)

MEMORY_LAYOUTS = ChoiceEnum(["rmt", "mt"])
STATE_DTYPES = ChoiceEnum(list(associative.STATE_DTYPES))
SCHEDULE_CHOICES = ChoiceEnum(list(SCHEDULES))  # the segment loop's schedules (modules/recurrence.py)
INIT_SCHEMES = ChoiceEnum(["fairseq", "normal", "uniform"])
EMBEDDING_IMPLS = ChoiceEnum(["fairseq", "transformer_xl"])


@dataclass
class TrainedWithConfig(FairseqDataclass):
    """What a model records when it is built for training (RecurrentLM.setup_from_task; written into the config
    fairseq saves by rmt_fairseq/compat.py) and every tool that loads its checkpoint uses or checks. Shared by
    the configs of both LM families."""

    dictionary_fingerprint: Optional[str] = field(
        default=None,
        metadata={"help": "set when the model is built for training: sha256 (16 hex digits) of the training "
                  "dictionary's symbols in order; a model loaded with another dict.txt (any order or size) stops "
                  "with an error naming both"},
    )
    trained_segment_len: Optional[int] = field(
        default=None,
        metadata={"help": "set when the model is built for training: the segment length it trains with (--segment-len, "
                  "or --tokens-per-sample under --task rmt_lm); every tool that loads the checkpoint uses it unless "
                  "given another"},
    )
    trained_tokens_per_sample: Optional[int] = field(
        default=None, metadata={"help": "set when the model is built for training under a per-sample task: its "
                                "sample length (a different one at evaluation is logged)"},
    )


@dataclass
class AssociativeConfig(FairseqDataclass):
    """ARMT's flags (Rodkin et al. 2024; modules/associative.py) and the inference schedule (modules/recurrence.py),
    shared by the three model families."""

    associative_memory: bool = field(
        default=False,
        metadata={"help": "ARMT: per layer an associative matrix written by the --mem-tokens memory tokens at the end "
                  "of each segment and read by every token of the next (Rodkin et al. 2024); memory tokens are "
                  "learned, not carried"},
    )
    d_mem: int = field(default=64, metadata={"help": "--associative-memory: key dimension D before DPFP (the matrix "
                                                     "has 2 x --dpfp-nu x D rows per layer)"})
    dpfp_nu: int = field(default=3, metadata={"help": "--associative-memory: DPFP's nu (the paper's 3)"})
    associative_state_dtype: STATE_DTYPES = field(
        default="fp32",
        metadata={"help": "--associative-memory: dtype the associative state is accumulated in: fp32 (also under "
                  "--bf16/--fp16) or model (the model's dtype)"},
    )
    inference_schedule: SCHEDULE_CHOICES = field(
        default="sequential",
        metadata={"help": "without gradients (validation, eval-lm, generation's completed segments, "
                  "rmt-extrapolate*): sequential, or diagonal (Sivtsov et al. 2025: the (segment, layer) grid by "
                  "anti-diagonals, one batched call per diagonal; exact; applies to --associative-memory and no "
                  "memory, and rmt_lm's --mem-len; not to RMT's token memory, which stays sequential, nor under "
                  "ZeRO-3; rmt_lm needs several segments per call: --task rmt_lm validation and eval-lm get them "
                  "with --eval-segments-per-batch)"},
    )


def validate_associative(cfg) -> None:
    """One error line for an ARMT flag that cannot work."""
    if not getattr(cfg, "associative_memory", False):
        return
    check(cfg.d_mem >= 1, f"--d-mem must be >= 1, got {cfg.d_mem}")
    check(cfg.dpfp_nu >= 1, f"--dpfp-nu must be >= 1, got {cfg.dpfp_nu}")
    check(cfg.mem_tokens > 0, f"--associative-memory needs memory tokens to write it: --mem-tokens must be > 0, got "
                              f"{cfg.mem_tokens}")
    try:
        layout = str(cfg.memory_layout)
    except Exception:  # the transformer_lm wrapper has no --memory-layout (OmegaConf raises its own error)
        layout = "rmt"
    check(layout == "rmt",
          f"--associative-memory writes from memory tokens at the end of each segment: --memory-layout "
          f"{layout} has none (use --memory-layout rmt)")


@dataclass
class RMTLanguageModelConfig(AssociativeConfig, TrainedWithConfig):
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
    mem_tokens: int = field(
        default=10,
        metadata={"help": "RMT memory tokens M (read block before, write block after each segment); 0 = none"},
    )
    mem_len: int = field(
        default=0, metadata={"help": "Transformer-XL cache length L (detached per-layer states); 0 = none"}
    )
    memory_layout: MEMORY_LAYOUTS = field(
        default="rmt",
        metadata={"help": "rmt: read+write memory carried across segments; mt: memory tokens at the start "
                  "only, no recurrence (the paper's MT ablation)"},
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
    segment_len: Optional[int] = field(
        default=None,
        metadata={"help": "per-sample recurrence under fairseq's own tasks (--task language_modeling): every sample "
                  "is split into segments of this many tokens, memory starts fresh per sample (default: the "
                  f"architecture's segment length, else {DEFAULT_SEGMENT_LEN}). Under --task rmt_lm segments are "
                  "--tokens-per-sample"},
    )
    segment_bptt_unroll: Optional[int] = field(
        default=None,
        metadata={"help": "per-sample recurrence: memory detached every K+1 segments of a sample (default: "
                  "gradient through the whole sample). Under --task rmt_lm: --bptt-unroll"},
    )
    tokens_per_sample: Optional[int] = II("task.tokens_per_sample")


class RMTDecoder(HasMemoryTokens, FairseqIncrementalDecoder):
    """Transformer-XL decoder with memory tokens; implements the segment interface of modules/recurrence.py."""

    def __init__(self, cfg: RMTLanguageModelConfig, dictionary, embed_tokens: nn.Module):
        super().__init__(dictionary)
        C, H = cfg.decoder_embed_dim, cfg.decoder_attention_heads
        self.embed_dim, self.num_layers = C, cfg.decoder_layers
        self.mem_len = cfg.mem_len
        self.checkpoint_activations = cfg.checkpoint_activations
        self.layout_name = str(cfg.memory_layout)
        self.padding_idx = dictionary.pad()
        self.embed_tokens = embed_tokens
        self.embed_scale = 1.0 if cfg.no_scale_embedding else math.sqrt(C)
        self.dropout = nn.Dropout(cfg.dropout)
        self.memory_dropout = not cfg.no_memory_dropout
        # memory rows and the XL cache (modules/memory.py); None: a config from before the switch existed
        rmc = getattr(cfg, "read_mem_from_cache", False)
        self.mem_cache_rule = "write" if rmc is None else ("both" if rmc else "none")
        self.same_length = bool(cfg.same_length)
        self.clamp_len = max(int(cfg.clamp_len), 0)
        self.memory = MemoryTokens(cfg.mem_tokens, C) if cfg.mem_tokens > 0 else None
        head_dim = cfg.decoder_head_dim or C // H
        self.layers = nn.ModuleList(
            RelativeDecoderLayer(C, H, head_dim, cfg.decoder_ffn_embed_dim, cfg.dropout, cfg.attention_dropout,
                                 cfg.activation_dropout)
            for _ in range(cfg.decoder_layers)
        )
        # XL's u and v (r_w_bias, r_r_bias), shared across layers as in the original (untie_r=False)
        self.pos_bias = PositionBias(H, head_dim)
        self.layouts = LayoutCache(C)
        self.segment_len = int(cfg.tokens_per_sample or DEFAULT_SEGMENT_LEN)  # generation: the trained length

        self.adaptive_softmax = None
        self.output_projection = None
        if str(cfg.embedding_impl) == "transformer_xl":
            cutoffs = _cutoffs(cfg)
            tied = cfg.tie_adaptive_weights or cfg.share_decoder_input_output_embed
            # XL's tie_projs: [False] + [tie] * clusters (the first band's projection is never shared)
            self.adaptive_softmax = XLAdaptiveLogSoftmax(
                len(dictionary), C, C, cutoffs, cfg.div_val, tied_embedding=embed_tokens if tied else None,
                tie_projs=[False] + [bool(cfg.tie_adaptive_proj)] * len(cutoffs))
        elif cfg.adaptive_softmax_cutoff is not None:
            self.adaptive_softmax = AdaptiveSoftmax(
                len(dictionary), C, options.eval_str_list(cfg.adaptive_softmax_cutoff, type=int),
                dropout=cfg.adaptive_softmax_dropout,
                adaptive_inputs=embed_tokens if cfg.tie_adaptive_weights else None,
                factor=cfg.adaptive_softmax_factor, tie_proj=cfg.tie_adaptive_proj,
            )
        else:
            self.output_projection = nn.Linear(C, len(dictionary), bias=False)
            if cfg.share_decoder_input_output_embed:
                self.output_projection.weight = embed_tokens.weight
            else:
                nn.init.normal_(self.output_projection.weight, mean=0, std=C**-0.5)
        if str(cfg.init) != "fairseq":  # Transformer-XL's weights_init over the whole decoder (embeddings included)
            init_transformer_xl_(self, str(cfg.init), cfg.init_std, cfg.init_range, cfg.proj_init_std)
        # ARMT: one associative block per layer (built after the XL init: W_V must start at zero)
        self.associative = bool(getattr(cfg, "associative_memory", False))
        self.assoc_layers = (nn.ModuleList(associative.AssociativeMemory(C, cfg.d_mem, cfg.dpfp_nu)
                                           for _ in range(cfg.decoder_layers)) if self.associative else None)
        self.assoc_dtype = associative.state_dtype(getattr(cfg, "associative_state_dtype", "fp32"))
        self.inference_schedule = str(getattr(cfg, "inference_schedule", "sequential"))

    @property
    def read_rows(self) -> int:
        """Memory rows before the segment: RMT's read memory, MT's tokens; none for ARMT and without memory."""
        return 0 if self.associative else self.num_mem_tokens

    @property
    def write_rows(self) -> int:
        """Memory rows after the segment: RMT's write memory, ARMT's writers; none for MT and without memory."""
        return self.num_mem_tokens if (self.recurrent or self.associative) else 0

    @property
    def diagonal_ok(self) -> bool:
        """The diagonal schedule is exact: layer l of a segment needs only layer l of the one before (no token
        memory going from the last layer to the first), and nothing records attention."""
        # ZeRO-3 gathers a weight only inside its own module's forward: the batched call reads them outside, so a
        # partitioned model runs sequentially
        return (not self.recurrent and not any(layer.attn.keep_attention for layer in self.layers)
                and not any(hasattr(p, "ds_id") for p in self.layers.parameters()))

    def layout(self, cache: int, read: int, segment: int, write: int) -> Layout:
        """The attention geometry of a segment with these block sizes under this model's switches."""
        return Layout(cache, read, segment, write, mem_cache=self.mem_cache_rule,
                      same_length=self.mem_len if self.same_length else 0, clamp_len=self.clamp_len)

    # ---- the segment interface used by modules/recurrence.py -------------------------------------------

    @property
    def recurrent(self) -> bool:
        """RMT's token memory: the write block's output is the next segment's read block (not MT, not ARMT)."""
        return self.memory is not None and self.layout_name == "rmt" and not self.associative

    def _segment_input(self, tokens: torch.Tensor, memory: Optional[torch.Tensor]):
        """tokens B x T -> (h B x (R+T+W) x C, the first layer's input; mem_drop: LM-RMT's memory dropout)."""
        B, T = tokens.shape
        M = self.num_mem_tokens
        x = self.embed_scale * self.embed_tokens(tokens)  # B x T x C
        mem_drop = self.memory_dropout and M > 0
        if not mem_drop:
            x = self.dropout(x)
        if M == 0:
            h = x
        elif self.associative:  # ARMT: learned memory tokens after the segment write the associative state
            h = torch.cat([x, self.memory(B)], dim=1)  # B x (T+M) x C
        elif self.recurrent:
            read = memory if memory is not None else self.memory(B)  # B x M x C
            # paper §3.2: the same memory is placed as the read block and as the write block
            h = torch.cat([read, x, read], dim=1)  # B x (M+T+M) x C
        else:  # MT: learned tokens in front of every segment, nothing carried
            h = torch.cat([self.memory(B), x], dim=1)  # B x (M+T) x C
        if mem_drop:  # LM-RMT: memory is concatenated before the embedding dropout
            h = self.dropout(h)
        return h, mem_drop

    def _segment_output(self, h: torch.Tensor, T: int, mem_drop: bool):
        """The last layer's output B x N x C -> (hidden B x T x C, written memory B x M x C or None)."""
        R = self.read_rows
        if mem_drop:  # LM-RMT: written memory is taken after the output dropout
            h = self.dropout(h)
            hidden = h[:, R : R + T]  # B x T x C
        else:
            hidden = self.dropout(h[:, R : R + T])  # B x T x C
        return hidden, (h[:, R + T :] if self.recurrent else None)

    def forward_segment(
        self, tokens: torch.Tensor, memory: Optional[torch.Tensor], cache: Optional[List[torch.Tensor]],
        assoc: Optional[List[torch.Tensor]] = None,
    ) -> SegmentOutput:
        """One segment: tokens B x T, RMT memory B x M x C, XL cache per layer B x L x C, ARMT state [A_0 B x F x C,
        z_0 B x F, ...] (None at a stream's start) -> SegmentOutput with the state handed to the next segment."""
        B, T = tokens.shape
        R, W = self.read_rows, self.write_rows
        h, mem_drop = self._segment_input(tokens, memory)
        L = cache[0].size(1) if cache is not None else 0
        pos_emb, rel_index, mask_bias = self.layouts.get(self.layout(L, R, T, W), h.device, h.dtype)
        pos_emb = self.dropout(pos_emb)
        u, v = self.pos_bias()  # H x D each

        new_cache = [] if self.mem_len > 0 else None
        new_assoc = [] if self.associative else None
        for i, layer in enumerate(self.layers):
            if self.associative:  # ARMT: every row reads layer i's associative memory before the layer
                A, z = associative.layer_state(assoc, i)
                h = self.assoc_layers[i].read(h, A, z, self.assoc_dtype)
            if new_cache is not None:
                # XL caches each layer's input for the segment tokens only; memory travels through RMT
                seg = h[:, R : R + T]  # B x T x C
                prev = cache[i] if cache is not None else seg[:, :0]
                new_cache.append(torch.cat([prev, seg], dim=1)[:, -self.mem_len :].detach())  # B x L' x C
            layer_cache = cache[i] if cache is not None else None
            if self.checkpoint_activations and self.training and torch.is_grad_enabled():
                h = torch_checkpoint(layer, h, layer_cache, pos_emb, rel_index, mask_bias, u, v, use_reentrant=False)
            else:
                h = layer(h, layer_cache, pos_emb, rel_index, mask_bias, u, v)  # B x (R+T+W) x C
            if self.associative:  # ... and its memory-token rows write it for the next segment
                new_assoc += self.assoc_layers[i].write(h[:, R + T :], A, z, self.assoc_dtype)
        hidden, new_memory = self._segment_output(h, T, mem_drop)
        return SegmentOutput(hidden=hidden, memory=new_memory, cache=new_cache, assoc=new_assoc)

    # ---- the diagonal schedule (modules/recurrence.py): the same computation, layers batched ------------

    def diagonal_begin(self, tokens: torch.Tensor, cache_len: int):
        """tokens B x T -> (layer-0 input B x N x C, the segment's geometry)."""
        T = tokens.size(1)
        h, mem_drop = self._segment_input(tokens, None)
        R, W = self.read_rows, self.write_rows
        pos_emb, rel_index, mask_bias = self.layouts.get(self.layout(cache_len, R, T, W), h.device, h.dtype)
        return h, (T, mem_drop, self.dropout(pos_emb), rel_index, mask_bias)

    def diagonal_end(self, h: torch.Tensor, tables) -> torch.Tensor:
        return self._segment_output(h, tables[0], tables[1])[0]

    def diagonal_weights(self):
        """Every layer's weights (and ARMT's blocks', as "assoc.*") stacked along a first dim of n_layers
        (stack_layers: built per call of the diagonal schedule)."""
        return stack_layers({"": self.layers, **({"assoc.": self.assoc_layers} if self.associative else {})})

    @torch.no_grad()
    def diagonal_layers(self, first: int, hs: torch.Tensor, tables, caches: Optional[torch.Tensor],
                        assoc: Optional[List[torch.Tensor]], weights):
        """Layers first .. first+G-1, each on its own segment, as one batched call (eval mode: no dropout).
        hs G x B x N x C; tables: each segment's (diagonal_begin); caches G x B x L x C or None; assoc
        [A G x B x F x C, z G x B x F] or None (the segments' first) -> (hs out, the segment rows of each layer's
        input for the XL cache or None, new [A, z] or None). The same operations as forward_segment with
        RelativeDecoderLayer's, in the same order."""
        T, _, pos_emb, rel_index, mask_bias = tables[0]  # the same for the group (same shape and cache length)
        G, B, N, C = hs.shape
        sl = slice(first, first + G)
        w = {k: v[sl] for k, v in weights.items()}  # G x ...

        def lin(x, name, bias=None):  # nn.Linear per layer: x G x ... x C_in -> G x ... x C_out (bmm / baddbmm, as
            flat = x.reshape(G, -1, x.size(-1))  # F.linear's mm / addmm on the flattened rows of one layer)
            wt = w[name].transpose(-1, -2)
            y = torch.bmm(flat, wt) if bias is None else torch.baddbmm(w[bias].unsqueeze(1), flat, wt)
            return y.view(*x.shape[:-1], y.size(-1))

        x = hs
        R = self.read_rows
        dt = self.assoc_dtype or x.dtype
        if self.associative:
            mq = associative.feature(associative.project(x, w["assoc.q_proj.weight"][:, None]).to(dt),
                                     self.assoc_layers[0].nu)  # G x B x N x F
            x = associative.read(x, mq, *(assoc if assoc is not None else (None, None)))
        seg_in = x[:, :, R : R + T] if self.mem_len > 0 else None
        attn = self.layers[first].attn
        H, D = attn.num_heads, attn.head_dim
        q, k, val = lin(x, "attn.qkv.weight").chunk(3, dim=-1)  # each G x B x N x H*D
        if caches is not None and caches.size(2) > 0:
            _, ck, cv = lin(caches, "attn.qkv.weight").chunk(3, dim=-1)  # G x B x L x H*D
            k, val = torch.cat([ck, k], dim=2), torch.cat([cv, val], dim=2)
        heads = lambda t: t.reshape(G * B, t.size(2), H, D).transpose(1, 2)  # noqa: E731  (G*B) x H x n x D
        q, k, val = heads(q), heads(k), heads(val)
        Kn = k.size(2)
        u, v = self.pos_bias()
        r = lin(pos_emb.expand(G, *pos_emb.shape), "attn.r_proj.weight").view(G, -1, H, D)  # G x P x H x D
        bd = torch.einsum("gbhnd,gphd->gbhnp", (q + v[None, :, None, :]).view(G, B, H, N, D), r)  # G x B x H x N x P
        bd = bd.gather(-1, rel_index.expand(G, B, H, N, Kn))  # G x B x H x N x K
        bias = (bd * attn.scale + mask_bias).reshape(G * B, H, N, Kn)
        out = F.scaled_dot_product_attention(q + u[None, :, None, :], k, val, attn_mask=bias.to(q.dtype),
                                             scale=attn.scale)  # (G*B) x H x N x D
        out = lin(out.transpose(1, 2).reshape(G, B, N, H * D), "attn.out_proj.weight")  # G x B x N x C

        def norm(y, name):  # LayerNorm per layer (one fused call each: the same rounding as the layer's own)
            eps = self.layers[first].attn_norm.eps
            return torch.stack([F.layer_norm(y[g], (C,), w[name + ".weight"][g], w[name + ".bias"][g], eps)
                                for g in range(G)])

        x = norm(x + out, "attn_norm")
        f = lin(torch.relu(lin(x, "ffn.0.weight", "ffn.0.bias")), "ffn.3.weight", "ffn.3.bias")
        x = norm(x + f, "ffn_norm")
        new_assoc = None
        if self.associative:
            mem = x[:, :, R + T :]  # G x B x M x C
            nu = self.assoc_layers[0].nu
            mk = associative.feature(associative.project(mem, w["assoc.k_proj.weight"][:, None]).to(dt), nu)
            vv = associative.project(mem, w["assoc.v_proj.weight"][:, None]).to(dt)
            beta = associative.gate(mem, w["assoc.beta_proj.weight"][:, None, 0], w["assoc.beta_proj.bias"][:, None]
                                    ).to(dt)  # G x B x M x 1
            new_assoc = list(associative.update(mk, vv, beta, *(assoc if assoc is not None else (None, None))))
        return x, seg_in, new_assoc

    def segment_loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return segment_nll(self, hidden, target)

    # ---- fairseq decoder interface (used by fairseq-eval-lm's SequenceScorer) ----------------------------

    def token_log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """B x T x C -> B x T x V log-probabilities (greedy decoding, accuracies)."""
        if self.adaptive_softmax is not None:
            return self.adaptive_softmax.get_log_prob(hidden, None)
        return F.log_softmax(self.output_projection(hidden).float(), dim=-1)

    def output_layer(self, features: torch.Tensor) -> torch.Tensor:
        if self.adaptive_softmax is not None:
            return features  # AdaptiveSoftmax.get_log_prob takes the features
        return self.output_projection(features)

    # ---- generation (fairseq's SequenceGenerator: fairseq-interactive, hub sample()) ------------------------
    #
    # Completed segments go through the segment loop exactly as in training (their write memory and XL cache
    # are computed by run_segments once the segment is full). Inside the current segment, each new token is
    # one query row against cached keys/values: no recomputation of the segment per token.

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, **kwargs):
        """prev_output_tokens: B x t (the whole prefix). Returns (logits B x n x V for the n tokens not yet
        seen in incremental_state, or for all t without it, extra)."""
        if incremental_state is None:
            out = run_segments(self, prev_output_tokens, None, RecurrentState(), seg_len=self.segment_len,
                               return_hidden=True)
            return self.output_layer(torch.cat(out.hidden, dim=1)), {"attn": None}
        st = self.get_incremental_state(incremental_state, "rmt") or {"seen": 0, "t": 0, "state": RecurrentState()}
        new = prev_output_tokens[:, st["seen"] :]
        hidden = torch.stack([self._step(new[:, j], st) for j in range(new.size(1))], dim=1)  # B x n x C
        st["seen"] = prev_output_tokens.size(1)
        self.set_incremental_state(incremental_state, "rmt", st)
        return self.output_layer(hidden), {"attn": None}

    def _layout_tables(self, st):
        L = st["state"].cache[0].size(1) if st["state"].cache is not None else 0
        R = self.read_rows
        layout = self.layout(L, R, self.segment_len, self.write_rows)
        w = next(self.parameters())  # the model's device and dtype (a half/bf16 model generates in half/bf16)
        return L, R, self.layouts.get(layout, w.device, w.dtype)

    def _start_segment(self, st, B):
        """Keys/values of the XL cache and the read memory, per layer (rows 0..M-1 of the mask)."""
        state = st["state"]
        L, M, (pos_emb, rel_index, mask_bias) = self._layout_tables(st)
        kv = []
        x = None
        u, v = self.pos_bias()
        if M:  # read rows: RMT's carried memory or MT's tokens (ARMT has none)
            x = state.memory if (self.recurrent and state.memory is not None) else self.memory(B)
        for i, layer in enumerate(self.layers):
            past = layer.attn.project_kv(state.cache[i]) if state.cache is not None else None
            if x is None:
                kv.append(past)
                continue
            k_new, v_new = layer.attn.project_kv(x)
            x_next = layer(x, None, pos_emb, rel_index[:M, : L + M],
                           mask_bias[:M, : L + M], u, v, past)
            kv.append((torch.cat([past[0], k_new], 2), torch.cat([past[1], v_new], 2)) if past else (k_new, v_new))
            x = x_next
        st.update(kv=kv, seg=None, t=0)

    def _step(self, token, st):
        """One new token of the current segment -> its final hidden state B x C."""
        T = self.segment_len
        if st["t"] == T:  # the segment is complete: memory and cache through the segment loop, as in training
            run_segments(self, st["seg"], None, st["state"], seg_len=T)
            st["kv"] = None
        if st["t"] == T or st.get("kv") is None:
            self._start_segment(st, token.size(0))
        L, M, (pos_emb, rel_index, mask_bias) = self._layout_tables(st)
        row, cols = M + st["t"], L + M + st["t"] + 1
        x = self.embed_scale * self.embed_tokens(token[:, None])  # B x 1 x C
        u, v = self.pos_bias()
        for i, layer in enumerate(self.layers):
            if self.associative:  # ARMT: the read of the completed segments' associative state, as in training
                x = self.assoc_layers[i].read(x, *associative.layer_state(st["state"].assoc, i), self.assoc_dtype)
            k_new, v_new = layer.attn.project_kv(x)
            past = st["kv"][i]
            x_next = layer(x, None, pos_emb, rel_index[row : row + 1, :cols], mask_bias[row : row + 1, :cols],
                           u, v, past)
            st["kv"][i] = ((torch.cat([past[0], k_new], 2), torch.cat([past[1], v_new], 2)) if past
                           else (k_new, v_new))
            x = x_next
        # a copy: `token` is a view of the generator's token buffer, which beam search reorders in place (this
        # state is reordered by reorder_incremental_state; a view would be reordered twice)
        token = token[:, None].clone()
        st["seg"] = token if st["seg"] is None else torch.cat([st["seg"], token], dim=1)
        st["t"] += 1
        return x[:, 0]

    def reorder_incremental_state(self, incremental_state, new_order):
        st = self.get_incremental_state(incremental_state, "rmt")
        if st is None:
            return
        pick = lambda t: None if t is None else t.index_select(0, new_order)  # noqa: E731
        state = st["state"]
        state.memory = pick(state.memory)
        state.cache = None if state.cache is None else [pick(c) for c in state.cache]
        state.assoc = None if state.assoc is None else [pick(a) for a in state.assoc]
        st["seg"] = pick(st["seg"])
        st["kv"] = None if st.get("kv") is None else [None if kv is None else (pick(kv[0]), pick(kv[1]))
                                                      for kv in st["kv"]]
        self.set_incremental_state(incremental_state, "rmt", st)

    def max_positions(self):
        return int(1e9)  # relative positions: any length (fairseq's generator needs a number)


class StreamStates:
    """fairseq-eval-lm's recurrent state for one pass over a split: a RecurrentState per model of the ensemble
    (SequenceScorer calls every model with the same net_input), created on first use. The task puts one into
    every batch's net_input; the model's forward carries it from batch to batch. (Not a dict: fairseq's
    move_to_cuda rebuilds dicts, which would drop the state between batches.)"""

    def __init__(self):
        self.states = {}

    def for_model(self, model) -> RecurrentState:
        return self.states.setdefault(id(model), RecurrentState())


def segment_nll(decoder, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed NLL (nats, fp32) of target B x T given hidden B x T x C; pad targets are ignored. `decoder` has
    fairseq's output attributes (adaptive_softmax or output_projection): RMTDecoder and TransformerDecoder."""
    if isinstance(decoder.adaptive_softmax, XLAdaptiveLogSoftmax):
        return decoder.adaptive_softmax.nll(hidden, target, decoder.padding_idx)
    if decoder.adaptive_softmax is not None:
        # every tail runs (data-parallel safe) and pad is ignored in the head only: modules/adaptive.py
        return adaptive_softmax_nll(decoder.adaptive_softmax, hidden, target, decoder.padding_idx)
    logits = decoder.output_layer(hidden)  # B x T x V
    return F.cross_entropy(logits.float().flatten(0, 1), target.reshape(-1), ignore_index=decoder.padding_idx,
                           reduction="sum")


class RecurrentLM:
    """What both LM families (rmt_lm, rmt_transformer_lm) share: recurrence set up from the task, and the one
    forward every caller goes through (the training and validation criteria, fairseq-eval-lm's SequenceScorer,
    fairseq's own criteria), so a DDP / DeepSpeed / fully-sharded wrapper around the model sees every step.

    Stream-level (--task rmt_lm, rmt_algorithmic): the caller passes the recurrent state (`rmt_state`) and gets
    the updated one back; without one, memory starts fresh. Nothing is kept on the model between calls.
    Per-sample (every other task, e.g. --task language_modeling): each sample split into segments of
    --segment-len, memory fresh per sample, truncated by --segment-bptt-unroll."""

    def setup_from_task(self, cfg, task) -> None:
        """What the model takes from the task: the data's dict.txt (named when a checkpoint's vocabulary
        differs), stream-level or per-sample recurrence, and the segment length."""
        # fairseq's language_modeling is a legacy task: its config is `args`, not `cfg`
        task_cfg = getattr(task, "cfg", None) or getattr(task, "args", None)
        data = getattr(task_cfg, "data", None)
        self.dictionary_file = (os.path.join(data.split(os.pathsep)[0], "dict.txt")
                                if isinstance(data, str) and data not in ("", "???") else None)
        # what the model is trained with travels in its config (saved in every checkpoint): recorded here when
        # built for training (rmt_fairseq.compat writes it into the config fairseq saves), checked / used when a
        # checkpoint's config comes back
        self.trained_with = {}
        dictionary = getattr(task, "source_dictionary", None)
        if dictionary is not None and hasattr(dictionary, "symbols"):
            saved = getattr(cfg, "dictionary_fingerprint", None)
            from rmt_fairseq.checkpoints import last_loaded

            source = f"the checkpoint {last_loaded()}" if saved is not None and last_loaded() else "the checkpoint"
            check_fingerprint(saved, dictionary, source, self.dictionary_file or "the data's dict.txt")
            if saved is None:
                self.trained_with["dictionary_fingerprint"] = dictionary_fingerprint(dictionary)
        self.per_sample = not getattr(task, "stream_level", False)
        self.segment_bptt_unroll = getattr(cfg, "segment_bptt_unroll", None)
        if self.segment_bptt_unroll is not None:
            check(self.segment_bptt_unroll >= 0, f"--segment-bptt-unroll must be >= 0, got {self.segment_bptt_unroll}")
        T = self._segment_len_from(cfg, task, task_cfg)
        self.decoder.segment_len = T
        max_pos = getattr(getattr(self.decoder, "embed_positions", None), "max_positions", None)
        check(max_pos is None or T <= max_pos,
              f"segment length {T} is longer than the model's learned position table ({max_pos} positions, "
              f"--max-target-positions / --tokens-per-sample it was trained with): every segment's tokens get "
              f"positions 1..T; use a segment length <= {max_pos}")
        if self.per_sample:
            self._check_sample_length(T, cfg, task, task_cfg)

    def _segment_len_from(self, cfg, task, task_cfg) -> int:
        """The segment length every door uses, and where it comes from (logged once per model build).

        The model keeps what it was trained with in its config (`trained_segment_len`, saved in every checkpoint):
        set when the model is built for training, from --tokens-per-sample (stream-level, --task rmt_lm) or
        --segment-len (per-sample, any other task). A loaded model runs at that length unless the user gives
        another one: --tokens-per-sample under --task rmt_lm (eval-lm, validate, interactive, the hub's
        `tokens_per_sample=`), `segment_len` under per-sample tasks (--model-overrides / the hub's `segment_len=`);
        every tool then uses it alike (the stream task's batches are cut to it, models/rmt_lm.py and generation
        run it)."""
        trained = getattr(cfg, "trained_segment_len", None)
        if not self.per_sample:
            if getattr(task, "seg_len", 0) is None:  # rmt_algorithmic: each batch names its own segment length
                return int(cfg.tokens_per_sample or trained or DEFAULT_SEGMENT_LEN)
            given = getattr(task_cfg, "tokens_per_sample", None)
            flag = "--tokens-per-sample"
            # a checkpoint from before trained_segment_len: the --tokens-per-sample saved with its model config
            T = int(given or trained or cfg.tokens_per_sample or DEFAULT_SEGMENT_LEN)
        else:
            given, flag = cfg.segment_len, "segment_len"  # --segment-len in training, --model-overrides after
            T = int(given or trained or DEFAULT_SEGMENT_LEN)
            check(T >= 1, f"--segment-len must be >= 1, got {T}")
        if trained is None:  # built for training (or an older checkpoint): what it trains with travels with it
            self.trained_with["trained_segment_len"] = T
            return T
        if T != trained:
            # a warning, not info: an evaluation line copied from another model's docs is the usual way to get here
            logger.warning("segment length %d (%s %d given), not the %d the model was trained with: this run uses "
                           "%d", T, flag, T, trained, T)
        else:
            logger.info("segment length %d, as the model was trained (from its checkpoint)", T)
        if not self.per_sample and given is None and getattr(task_cfg, "tokens_per_sample", 0) is None:
            task_cfg.tokens_per_sample = T  # the stream task cuts its batches to the model's segment length
        return T

    def _check_sample_length(self, T: int, cfg, task, task_cfg) -> None:
        """Per-sample recurrence: a sample (--tokens-per-sample S of the task) is whole segments; under
        fairseq-eval-lm --context-window C each scored block is C context tokens + S - C new ones, so C is whole
        segments too (the scored tokens then sit where they would in a sample without context)."""
        S = getattr(task_cfg, "tokens_per_sample", None)  # the task's sample length
        name = type(task).__name__
        context = eval_context_window()
        trained_S = getattr(cfg, "trained_tokens_per_sample", None)
        if trained_S is None:
            self.trained_with["trained_tokens_per_sample"] = S
        elif isinstance(S, int) and S + context != trained_S:
            logger.warning("samples of %d tokens (--tokens-per-sample, %s): the model was trained on samples of %d, "
                           "so memory now spans %d segments per sample instead of %d; pass --tokens-per-sample %d to "
                           "evaluate as trained", S + context,
                           "fairseq's default" if S + context == 1024 else "given", trained_S, (S + context) // T,
                           trained_S // T, trained_S)
        if isinstance(S, int) and context:
            S += context  # fairseq-eval-lm took the context window off --tokens-per-sample before the task saw it
            check(context < S, f"--context-window {context} must be smaller than --tokens-per-sample {S} (each scored "
                               f"block is the context plus --tokens-per-sample minus --context-window new tokens); "
                               f"use --context-window {max(S - T, 0) if S % T == 0 else T} or a larger "
                               f"--tokens-per-sample")
            multiples = [c for c in range(T, S, T)]
            check(S % T != 0 or context % T == 0,
                  f"--context-window {context} is not a multiple of --segment-len {T}: per-sample recurrence splits "
                  f"each scored block (context + new tokens, --tokens-per-sample {S} in all) into segments of {T} "
                  f"from its start, so the scored tokens would start inside a segment; use --context-window "
                  f"{' or '.join(map(str, multiples[:3])) if multiples else 0}")
        if isinstance(S, int) and S > 0:
            if S % T:
                divisors = [d for d in range(min(T, S), 0, -1) if S % d == 0][:1]
                fits = " or ".join(str(n) for n in sorted({max(T, S // T * T), (S // T + 1) * T}))
                raise RMTConfigError(
                    f"--tokens-per-sample {S} is not a multiple of --segment-len {T}: per-sample recurrence "
                    f"({name}) splits every sample into whole segments; use --tokens-per-sample {fits}, or a "
                    f"--segment-len dividing {S} (e.g. "
                    f"{divisors[0]}); for memory carried across the whole corpus use --task rmt_lm (segments of "
                    f"--tokens-per-sample, streams read in order)")
            if S == T and getattr(self.decoder, "recurrent", False):
                logger.warning("--segment-len %d equals --tokens-per-sample: one segment per sample, memory "
                               "tokens never carry anything to a next segment; use a shorter --segment-len", T)
        logger.info("per-sample recurrence (%s): segments of %d tokens, memory fresh per sample", name, T)

    def forward(self, src_tokens, src_lengths=None, segment_len: Optional[int] = None, target=None,
                rmt_state=None, bptt_unroll: Optional[int] = 0, bptt_mode: str = "block",
                checkpoint_segments: bool = False, **kwargs):
        """Run src_tokens B x S*T through the segment loop (modules/recurrence.py).

        rmt_state: the streams' RecurrentState (stream-level tasks; updated and returned, moved to the model's
        device and dtype first), a StreamStates (fairseq-eval-lm: one state per model of an ensemble), or None
        (fresh memory). Per-sample models ignore it and start every sample fresh.

        Without target: (logits B x S*T x V, or the features with an adaptive softmax; extra) as fairseq's
        decoders return, extra["rmt_state"] the updated state. With target B x S*T (the criteria): (summed NLL
        per scored segment, fp32 S; extra) with extra["ntokens"] (scored targets), extra["memory_ok"] (bool S:
        whether the memory each segment wrote is finite; device tensor, no host sync) and extra["rmt_state"].
        bptt_unroll / bptt_mode / checkpoint_segments: truncation and recomputation (stream-level; per-sample
        models use --segment-bptt-unroll)."""
        if self.per_sample:
            state, bptt_unroll, bptt_mode = RecurrentState(), self.segment_bptt_unroll, "block"
        elif isinstance(rmt_state, StreamStates):
            state = rmt_state.for_model(self)
        else:
            state = rmt_state if rmt_state is not None else RecurrentState()
        param = next(self.parameters())
        # a resumed / exported state joins the model's device and dtype (ARMT's state: its own dtype)
        state.to(src_tokens.device, param.dtype, getattr(self.decoder, "assoc_dtype", None) or param.dtype)
        seg_len = int(segment_len or self.decoder.segment_len)
        schedule = getattr(self.decoder, "inference_schedule", "sequential")
        if target is None:
            out = run_segments(self.decoder, src_tokens, None, state, seg_len=seg_len, bptt_unroll=bptt_unroll,
                               return_hidden=True, schedule=schedule)
            features = torch.cat(out.hidden, dim=1)  # B x S*T x C
            return self.decoder.output_layer(features), {"attn": None, "inner_states": None, "rmt_state": state}
        memory_ok = []  # per segment: is the memory it writes finite (device tensors: no sync here)

        def check_memory(s, o):  # RMT's memory tokens and ARMT's associative state
            written = ([o.memory] if o.memory is not None else []) + list(o.assoc or [])
            if written:
                memory_ok.append(torch.stack([torch.isfinite(t).all() for t in written]).all())

        out = run_segments(
            self.decoder, src_tokens, target, state, seg_len=seg_len, bptt_unroll=bptt_unroll, bptt_mode=bptt_mode,
            checkpoint_segments=checkpoint_segments, on_segment=check_memory, schedule=schedule,
        )
        losses = torch.stack(out.losses)  # S
        ok = torch.stack(memory_ok) if memory_ok else torch.ones_like(losses, dtype=torch.bool)
        return losses, {"ntokens": out.ntokens, "memory_ok": ok, "rmt_state": state}

    def prepare_for_inference_(self, cfg):
        """fairseq's, plus --bf16: fairseq 0.12's eval-lm, interactive, generate and hub interface apply --fp16
        (model.half()) and ignore --bf16; here a bfloat16 model, as fairseq-train --bf16 trains it."""
        super().prepare_for_inference_(cfg)
        common = getattr(cfg, "common", None)
        if getattr(common, "bf16", False) and not getattr(common, "fp16", False):
            self.to(dtype=torch.bfloat16)
        param = next(self.parameters())
        logger.info("inference in %s on %s", str(param.dtype).replace("torch.", ""), param.device)

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """fairseq's load, after a one-line error for a checkpoint trained on another vocabulary (fairseq's own
        is torch's size-mismatch traceback)."""
        check_vocabulary(state_dict, len(self.decoder.dictionary), "the checkpoint",
                         self.dictionary_file or "the data dictionary")
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)


@register_model("rmt_lm", dataclass=RMTLanguageModelConfig)
class RMTLanguageModel(RecurrentLM, FairseqLanguageModel):
    def __init__(self, decoder: RMTDecoder, cfg: RMTLanguageModelConfig):
        super().__init__(decoder)
        self.cfg = cfg

    @classmethod
    def build_model(cls, cfg: RMTLanguageModelConfig, task):
        cfg = _with_defaults(cfg)
        validate_config(cfg, len(task.source_dictionary))
        dictionary = task.source_dictionary
        C = cfg.decoder_embed_dim
        if str(cfg.embedding_impl) == "transformer_xl":
            cutoffs = _cutoffs(cfg)
            embed_tokens = XLAdaptiveEmbedding(len(dictionary), C, C, cutoffs, cfg.div_val, dictionary.pad())
            if str(cfg.init) == "fairseq":  # fairseq's embedding convention, per band
                for band in embed_tokens.emb_layers:
                    nn.init.normal_(band.weight, mean=0, std=C**-0.5)
                    if band.padding_idx is not None:
                        nn.init.constant_(band.weight[band.padding_idx], 0)
        elif cfg.adaptive_input:
            cutoff = cfg.adaptive_input_cutoff or cfg.adaptive_softmax_cutoff
            check(cutoff is not None, "--adaptive-input needs --adaptive-input-cutoff or --adaptive-softmax-cutoff")
            # every band runs on every call (modules/adaptive.py): data-parallel safe
            embed_tokens = DenseAdaptiveInput(len(dictionary), dictionary.pad(), C, cfg.adaptive_input_factor, C,
                                              options.eval_str_list(cutoff, type=int))
        else:
            embed_tokens = nn.Embedding(len(dictionary), C, padding_idx=dictionary.pad())
            nn.init.normal_(embed_tokens.weight, mean=0, std=C**-0.5)
            nn.init.constant_(embed_tokens.weight[dictionary.pad()], 0)
        model = cls(RMTDecoder(cfg, dictionary, embed_tokens), cfg)
        model.setup_from_task(cfg, task)
        threads.configure(model)  # torch's intra-op threads for a CPU run (rmt_fairseq/threads.py)
        return model

    def max_positions(self):
        return self.decoder.max_positions()


def _cutoffs(cfg) -> List[int]:
    """--adaptive-softmax-cutoff as integers ([] when unset)."""
    return options.eval_str_list(cfg.adaptive_softmax_cutoff, type=int) if cfg.adaptive_softmax_cutoff else []


def vocabulary_size(state_dict) -> Optional[int]:
    """The dictionary size a saved rmt_lm state dict was trained with: rows of its input embedding (the sum
    over the bands of an adaptive input). None if it has neither."""
    if "decoder.embed_tokens.weight" in state_dict:
        w = state_dict["decoder.embed_tokens.weight"]
        return int(w.shape[0]) if w.dim() == 2 else None  # ZeRO-3 module states hold empty placeholders
    # fairseq's AdaptiveInput (embeddings.N.0) or Transformer-XL's AdaptiveEmbedding (emb_layers.N)
    bands = [v for k, v in state_dict.items()
             if re.fullmatch(r"decoder\.embed_tokens\.(embeddings\.\d+\.0|emb_layers\.\d+)\.weight", k)]
    if not bands or any(b.dim() != 2 for b in bands):
        return None
    return sum(int(b.shape[0]) for b in bands)


def check_vocabulary(state_dict, built: int, source: str, dict_file: str) -> None:
    """One line naming both files when a checkpoint was trained on another vocabulary than the data's."""
    saved = vocabulary_size(state_dict)
    check(saved is None or saved == built,
          f"{source} was trained with a vocabulary of {saved} types, but {dict_file} has {built}: the data was "
          f"binarized with another dictionary; binarize it with the checkpoint's (fairseq-preprocess --srcdict "
          f"<its data>/dict.txt)")


def dictionary_fingerprint(dictionary) -> str:
    """sha256 (first 16 hex digits) of a fairseq Dictionary's symbols in index order: equal iff every token id
    means the same token (counts do not matter)."""
    import hashlib

    return hashlib.sha256("\n".join(dictionary.symbols).encode("utf-8")).hexdigest()[:16]


def check_fingerprint(saved: Optional[str], dictionary, source: str, dict_file: str) -> None:
    """One line naming both files when a model was trained on a dictionary with other token ids (a reordered,
    added or removed entry) than the data's dict.txt. `saved` None (older checkpoints): nothing to compare."""
    mine = dictionary_fingerprint(dictionary)
    check(saved is None or saved == mine,
          f"{source} was trained with another dictionary than {dict_file} (fingerprint {saved} vs {mine}: the same "
          f"token ids would mean other tokens); binarize the data with the checkpoint's dictionary "
          f"(fairseq-preprocess --srcdict <its data>/dict.txt)")


# Fields whose value for a checkpoint written before they existed is not their default (nor a preset's): what such
# a checkpoint was trained with (write memory saw the XL cache, memory tokens had no dropout, fairseq's embedding
# and softmax modules).
LEGACY_VALUES = {"read_mem_from_cache": None, "no_memory_dropout": True, "embedding_impl": "fairseq",
                 "init": "fairseq"}


def with_legacy_values(cfg):
    """A checkpoint's model config (OmegaConf): fields it lacks get LEGACY_VALUES (rmt_fairseq.compat calls this
    for every rmt_lm checkpoint, before fairseq applies the --arch preset)."""
    missing = {k: v for k, v in LEGACY_VALUES.items() if k not in cfg}
    if missing:
        with open_dict(cfg):
            for k, v in missing.items():
                cfg[k] = v
    return cfg


def _with_defaults(cfg):
    """Fields added after a checkpoint was written get their defaults, so old checkpoints stay loadable (fairseq
    merges dataclass defaults only when --arch is the model name, not for the presets)."""
    if not OmegaConf.is_config(cfg):
        return cfg
    missing = {k: v for k, v in vars(RMTLanguageModelConfig()).items() if k not in cfg and not k.startswith("_")
               and not (isinstance(v, str) and v.startswith("${"))}
    if missing:
        with open_dict(cfg):
            for k, v in missing.items():
                cfg[k] = v
    return cfg


# rmt_wt103's last cutoff, 200000, is 3/4 of WikiText-103's vocabulary (267,735 types): cutoffs suggested for another
# vocabulary keep the bands' ratios and put the last cutoff at the same place
LAST_CUTOFF_SHARE = 0.75


def fitting_cutoffs(cutoffs: List[int], vocab_size: int) -> Optional[List[int]]:
    """`cutoffs` scaled so that the last is LAST_CUTOFF_SHARE of `vocab_size`, rounded and kept increasing from 1;
    None when the vocabulary is too small for that many bands."""
    fit = []
    for c in cutoffs:
        fit.append(max(round(c * LAST_CUTOFF_SHARE * vocab_size / cutoffs[-1]), fit[-1] + 1 if fit else 1))
    return fit if fit[-1] < vocab_size else None


def check_cutoffs(cfg, vocab_size: int, flags, up_to_vocab: bool = False) -> None:
    """Adaptive input / softmax cutoffs (`flags`: (flag, value or None) pairs) that are increasing and below the
    vocabulary size (or equal to it, `up_to_vocab`: fairseq's own modules take that); otherwise one line naming the
    flag, its value (and the --arch preset that set it), with cutoffs that fit this vocabulary for every flag that
    does not."""
    bad = []
    for flag, value in flags:
        if value is None:
            continue
        try:
            cut = options.eval_str_list(value, type=int)
        except Exception:
            check(False, f"{flag} must be comma-separated integers, got {value!r}")
        increasing = all(a < b for a, b in zip([0] + cut, cut))
        if not (increasing and cut[-1] < vocab_size + up_to_vocab):
            bad.append((flag, value, fitting_cutoffs(cut, vocab_size) if increasing else None))
    if not bad:
        return
    flag, value, _ = bad[0]
    arch = _preset_setting(cfg, flag)
    bound = "at most" if up_to_vocab else "smaller than"
    text = f"{flag} {value}{f' (set by --arch {arch})' if arch else ''}: cutoffs must be increasing and {bound} the " \
           f"vocabulary size ({vocab_size})"
    fits = " ".join(f + " " + ",".join(map(str, fit)) for f, _, fit in bad if fit is not None)
    if fits:
        text += (f"; for this vocabulary pass e.g. {fits} (the same bands scaled so that the last cutoff is "
                 f"{LAST_CUTOFF_SHARE:.0%} of the vocabulary, as rmt_wt103's 200000 is of WikiText-103's 267,735 "
                 f"types)")
    raise RMTConfigError(text)


def _preset_setting(cfg, flag: str) -> Optional[str]:
    """The --arch preset of `cfg` when it sets `flag` to the value cfg has (the user may not have typed it)."""
    import argparse

    from fairseq.models import ARCH_CONFIG_REGISTRY

    arch = getattr(cfg, "_name", None) or getattr(cfg, "arch", None)
    if arch not in ARCH_CONFIG_REGISTRY:
        return None
    key = flag.lstrip("-").replace("-", "_")
    preset = argparse.Namespace(task=getattr(cfg, "task", None))
    try:
        ARCH_CONFIG_REGISTRY[arch](preset)
    except Exception:  # a preset reading a field this namespace lacks: say nothing about it
        return None
    return arch if getattr(preset, key, None) is not None and getattr(preset, key) == getattr(cfg, key, None) else None


def validate_config(cfg, vocab_size: int) -> None:
    """Stop before training on a flag that cannot work, naming the flag and its value."""
    for flag, value, low in [
        ("--mem-tokens", cfg.mem_tokens, 0),
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
    check(str(cfg.memory_layout) in ("rmt", "mt"), f"--memory-layout must be rmt or mt, got {cfg.memory_layout}")
    check(not (str(cfg.memory_layout) == "mt" and cfg.mem_tokens == 0),
          "--memory-layout mt needs --mem-tokens > 0, got --mem-tokens 0")
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
        cut = _cutoffs(cfg)
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
    validate_associative(cfg)
    check(not cfg.same_length or cfg.mem_len > 0,
          f"--same-length needs --mem-len > 0 (every token attends the --mem-len tokens before it and itself, "
          f"Transformer-XL's rule), got --mem-len {cfg.mem_len}")


# ---- architectures: size presets; every field stays overridable on the command line ---------------------


def _defaults(args, **values):
    # tokens_per_sample is rmt_lm's segment length (a task flag: the argparse namespace is flat). Under other
    # tasks (fairseq's language_modeling) --tokens-per-sample is the sample and the preset's segment length is the
    # per-sample --segment-len. (fairseq calls this function again on the model's own config, which has no
    # `task`: there segment_len is set too, and ignored under --task rmt_lm.)
    if getattr(args, "task", None) != "rmt_lm":
        values["segment_len"] = values.pop("tokens_per_sample", None)
    for k, v in values.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


# The authors' Transformer-XL conventions (LM-RMT pytorch/train.py defaults, the same as kimiyoung/transformer-xl):
# XL's weights_init, dropout inside the FFN, XL's adaptive embedding and softmax. Every value is checked against
# the authors' scripts by tests/models/test_paper_presets.py; examples/*/README.md list them side by side.
XL_CONVENTIONS = dict(init="normal", init_std=0.02, init_range=0.1, proj_init_std=0.01,
                      embedding_impl="transformer_xl")


@register_model_architecture("rmt_lm", "rmt_wt103")
def rmt_wt103(args):
    """Transformer-XL base for WikiText-103 (Dai et al. 2019; LM-RMT pytorch/run_wt103_base.sh) with 10 memory
    tokens; segment 150: 16 layers, C 410, 10 heads of 41, FFN 2100, dropout 0.1 (in the FFN too), dropatt 0,
    adaptive input and softmax with cutoffs 20000/40000/200000, div_val 1, tied."""
    _defaults(args, **XL_CONVENTIONS, decoder_layers=16, decoder_embed_dim=410, decoder_attention_heads=10,
              decoder_head_dim=41, decoder_ffn_embed_dim=2100, dropout=0.1, attention_dropout=0.0,
              activation_dropout=0.1, mem_tokens=10, mem_len=0, adaptive_softmax_cutoff="20000,40000,200000",
              div_val=1, adaptive_softmax_factor=1.0, adaptive_input=True, adaptive_input_factor=1.0,
              tie_adaptive_weights=True, tie_adaptive_proj=True, tokens_per_sample=150)


@register_model_architecture("rmt_lm", "rmt_enwik8")
def rmt_enwik8(args):
    """Transformer-XL 12-layer enwik8 model (LM-RMT pytorch/run_enwik8_base.sh) with 10 memory tokens; segment
    512, byte vocabulary: 12 layers, C 512, 8 heads of 64, FFN 2048, dropout 0.1 (in the FFN too), dropatt 0, a
    tied softmax with a bias."""
    _defaults(args, **XL_CONVENTIONS, decoder_layers=12, decoder_embed_dim=512, decoder_attention_heads=8,
              decoder_head_dim=64, decoder_ffn_embed_dim=2048, dropout=0.1, attention_dropout=0.0,
              activation_dropout=0.1, mem_tokens=10, mem_len=0, share_decoder_input_output_embed=True,
              tokens_per_sample=512)


@register_model_architecture("rmt_lm", "transformer_xl_wt103")
def transformer_xl_wt103(args):
    """The same backbone as rmt_wt103 as plain Transformer-XL: cache of 150, no memory tokens."""
    _defaults(args, mem_tokens=0, mem_len=150)
    rmt_wt103(args)


@register_model_architecture("rmt_lm", "transformer_xl_enwik8")
def transformer_xl_enwik8(args):
    """The same backbone as rmt_enwik8 as plain Transformer-XL: cache of 512, no memory tokens."""
    _defaults(args, mem_tokens=0, mem_len=512)
    rmt_enwik8(args)


@register_model_architecture("rmt_lm", "rmt_tiny")
def rmt_tiny(args):
    """2 layers, C=64: for tests and the CPU demo."""
    _defaults(args, decoder_layers=2, decoder_embed_dim=64, decoder_attention_heads=2,
              decoder_ffn_embed_dim=128, dropout=0.0, attention_dropout=0.0, mem_tokens=4, mem_len=0,
              share_decoder_input_output_embed=True, tokens_per_sample=32)


# ---- ARMT (Rodkin et al. 2024): the same backbones with per-layer associative memory ---------------------------
# d_mem and the memory-token counts are this project's defaults (the authors' scripts set D_MEM and MEMORY_SIZE per
# run); the diagonal schedule (exact) is on for inference.
ARMT = dict(associative_memory=True, dpfp_nu=3, inference_schedule="diagonal")


@register_model_architecture("rmt_lm", "armt_tiny")
def armt_tiny(args):
    """rmt_tiny with ARMT: 2 layers, C=64, 4 memory tokens writing a d_mem 16 associative memory per layer."""
    _defaults(args, **ARMT, d_mem=16)
    rmt_tiny(args)


@register_model_architecture("rmt_lm", "armt_wt103")
def armt_wt103(args):
    """rmt_wt103's Transformer-XL base with ARMT: 16 memory tokens, d_mem 64 per layer; segment 150."""
    _defaults(args, **ARMT, d_mem=64, mem_tokens=16)
    rmt_wt103(args)


@register_model_architecture("rmt_lm", "armt_enwik8")
def armt_enwik8(args):
    """rmt_enwik8's 12-layer model with ARMT: 16 memory tokens, d_mem 64 per layer; segment 512."""
    _defaults(args, **ARMT, d_mem=64, mem_tokens=16)
    rmt_enwik8(args)
