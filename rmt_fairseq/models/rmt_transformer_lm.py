"""The `rmt_transformer_lm` model: fairseq's own TransformerDecoder (transformer_lm), unchanged, with RMT read
and write memory tokens and the memory mask around it ("compatible with any model from the Transformer
family", Bulatov et al. 2022, §3.2).

Legend: B batch, T segment tokens, M memory tokens, N = M + T + M positions, C model dim.

fairseq's build runs as for transformer_lm (embeddings, adaptive input/softmax, tying, every preset), so the
parameters and their names are transformer_lm's, plus `decoder.memory.weight`: a transformer_lm checkpoint
loads (`--lm-path`, or `--restore-file`/`--finetune-from-model`: the memory tokens start fresh). Per segment the
decoder's own layers run on [read memory | segment | write memory] with the mask of modules/memory.py (no XL
cache), the same layer calls and flags as TransformerDecoder.extract_features.

Positions (absolute, learned or sinusoidal): the segment's tokens get the positions the stock model gives a
sample of T tokens (1..T after the padding offset), so a pretrained model's positions keep their meaning;
memory tokens get no position embedding (they are told apart by their own vectors and by the mask: read
memory sees only itself, write memory sees everything). With --mem-tokens 0 and one segment per sample the
model computes exactly what transformer_lm computes.

ARMT (--associative-memory, presets armt_transformer_lm*): the layout is [segment | write memory] with learned
memory tokens that are not carried; before every layer each row reads that layer's associative memory, and the
layer's output at the memory rows writes it (modules/associative.py). Its write projection starts at zero, so a
pretrained transformer_lm wrapped with it (--lm-path) computes what it computed before, per segment. Without
gradients, --inference-schedule diagonal runs an ARMT (or memoryless) wrapper's (segment, layer) grid by
anti-diagonals (modules/recurrence.py), fairseq's decoder layers batched (modules/fairseq_layers.py).
"""

import logging
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY, register_model, register_model_architecture
from fairseq.models.transformer import TransformerDecoder
from fairseq.models.transformer_lm import TransformerLanguageModel, TransformerLanguageModelConfig

from rmt_fairseq import threads
from rmt_fairseq.errors import RMTConfigError, check
from rmt_fairseq.models.config import (
    ARMT_BASE,
    MemoryConfig,
    SegmentConfig,
    TrainedWithConfig,
    check_cutoffs,
    register_presets,
    validate_memory,
    with_field_defaults,
)
from rmt_fairseq.models.recurrent_lm import RecurrentLM, segment_nll
from rmt_fairseq.models.trained_with import check_fingerprint, check_vocabulary, dictionary_fingerprint
from rmt_fairseq.modules import fairseq_layers
from rmt_fairseq.modules.adaptive import make_dense
from rmt_fairseq.modules.memory import Layout, LayoutCache
from rmt_fairseq.modules.recurrence import (
    DEFAULT_SEGMENT_LEN,
    RecurrentState,
    SegmentOutput,
    run_segments,
    stack_layers,
)
from rmt_fairseq.modules.schemes import SchemeModel, rows_around, scheme_from

logger = logging.getLogger(__name__)

# the memory scheme's parameters (modules/schemes.py), which a transformer_lm checkpoint lacks
MEMORY_PREFIXES = ("decoder.memory.", "decoder.memory_gate.", "decoder.assoc_layers.")


@dataclass
class RMTTransformerLMConfig(TransformerLanguageModelConfig, MemoryConfig, SegmentConfig, TrainedWithConfig):
    """fairseq's transformer_lm flags, the shared memory, per-sample and provenance fields (models/config.py)."""

    lm_path: Optional[str] = field(
        default=None,
        metadata={"help": "start from this fairseq transformer_lm checkpoint: its decoder weights load unchanged, "
                  "the memory tokens are new (the architecture flags must match the checkpoint's)"},
    )


class RMTTransformerDecoder(SchemeModel, TransformerDecoder):
    """fairseq's TransformerDecoder with the segment interface of modules/recurrence.py."""

    def init_memory(self, cfg) -> None:
        """The memory scheme of `cfg` (modules/schemes.py) and its modules, in the layers' dimension."""
        C = self.embed_dim if self.project_in_dim is None else self.project_in_dim.out_features
        self.install_scheme(scheme_from(cfg), C, self.num_layers, cfg)
        self.segment_len = DEFAULT_SEGMENT_LEN
        self.layouts = LayoutCache(C)  # the mask of modules/memory.py, built once per segment layout
        self.inference_schedule = str(getattr(cfg, "inference_schedule", "sequential"))

    def _segment_input(self, tokens: torch.Tensor, memory: Optional[torch.Tensor]):
        """tokens B x T -> (the first layer's input B x N x C, the key padding B x N bool or None, the layout's
        additive mask N x N, the memory read), as TransformerDecoder.extract_features builds them, with the scheme's
        memory rows around the segment (no position embedding: they are told apart by their vectors and the mask)."""
        B, T = tokens.shape
        R, W = self.scheme.before, self.scheme.after
        positions = self.embed_positions(tokens) if self.embed_positions is not None else None  # B x T x C
        x = self.embed_scale * self.embed_tokens(tokens.contiguous())
        if self.quant_noise is not None:
            x = self.quant_noise(x)
        if self.project_in_dim is not None:
            x = self.project_in_dim(x)
        if positions is not None:
            x = x + positions
        x, read = rows_around(self.scheme, self, x, memory)  # B x N x C
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = self.dropout_module(x)
        pad = tokens.eq(self.padding_idx)  # B x T
        self_attn_padding_mask = None
        if self.cross_self_attention or pad.any():
            self_attn_padding_mask = torch.cat([pad.new_zeros(B, R), pad, pad.new_zeros(B, W)], dim=1)  # B x N
        # [read | segment | write] mask, no cache; without memory the causal mask of buffered_future_mask
        mask = self.layouts.mask(Layout(0, R, T, W), x.device, x.dtype)
        return x, self_attn_padding_mask, mask, read

    def forward_segment(self, tokens: torch.Tensor, memory: Optional[torch.Tensor],
                        cache: Optional[List[torch.Tensor]] = None,
                        assoc: Optional[List[torch.Tensor]] = None) -> SegmentOutput:
        """TransformerDecoder.extract_features on [read | segment | write] (RMT) or [segment | write] (ARMT, whose
        state [A_0 B x F x C, z_0 B x F, ...] each layer reads before and writes after it); no encoder, no
        incremental state."""
        x, self_attn_padding_mask, mask, read = self._segment_input(tokens, memory)
        T, scheme = tokens.size(1), self.scheme
        written = scheme.written(0, T)
        x = x.transpose(0, 1)  # B x N x C -> N x B x C (fairseq layers)
        new_assoc = [] if scheme.associative else None
        for idx, layer in enumerate(self.layers):
            last = idx == self.num_layers - 1  # the stock call asks the last layer for attention weights
            # the scheme's read before the layer (ARMT: layer idx's associative memory), on a B x N x C view
            x = scheme.read(self, idx, x.transpose(0, 1), assoc).transpose(0, 1)
            x, _, _ = layer(x, None, None, None, self_attn_mask=mask, self_attn_padding_mask=self_attn_padding_mask,
                            need_attn=last, need_head_weights=last)
            if new_assoc is not None:  # ... and its write from the layer's output at the memory rows
                new_assoc += scheme.write(self, idx, x.transpose(0, 1), assoc, written)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        x = x.transpose(0, 1)  # N x B x C -> B x N x C
        new_memory = scheme.carry(self, x, written, read)  # B x M x C, in the input embedding space
        hidden = x[:, scheme.segment(0, T)]  # B x T x C
        if self.project_out_dim is not None:
            hidden = self.project_out_dim(hidden)
        return SegmentOutput(hidden=hidden, memory=new_memory, cache=None, assoc=new_assoc)

    def segment_loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return segment_nll(self, hidden, target)

    # ---- the diagonal schedule (modules/recurrence.py): the same computation, layers batched ------------


    @property
    def diagonal_ok(self) -> bool:
        """Exact for schemes carrying no token memory (schemes.MemoryScheme.diagonal_exact: ARMT, MT, none): layer l of
        a segment needs only layer l of the one before. Not for layers
        modules/fairseq_layers.py does not write (NormFormer's, cross self-attention), nor under ZeRO-3, whose
        partitioned weights are there only inside their module's forward."""
        return (self.scheme.diagonal_exact and all(fairseq_layers.plain(layer) for layer in self.layers)
                and not any(hasattr(p, "ds_id") for p in self.layers.parameters()))

    def diagonal_begin(self, tokens: torch.Tensor, cache_len: int):
        """tokens B x T -> (the first layer's input B x N x C, (T, the segment's additive mask with its padded keys
        at -inf: B x 1 x N x N, or N x N without padding))."""
        x, pad, mask, _ = self._segment_input(tokens, None)
        if pad is not None:  # as F.multi_head_attention_forward merges key padding into the additive mask
            mask = mask + torch.zeros_like(pad, dtype=mask.dtype).masked_fill(pad, float("-inf"))[:, None, None, :]
        return x, (tokens.size(1), mask)

    def diagonal_end(self, h: torch.Tensor, tables) -> torch.Tensor:
        """The decoder's final layer norm, the segment rows, project_out_dim, as forward_segment: B x T x C."""
        if self.layer_norm is not None:
            h = self.layer_norm(h)
        hidden = h[:, self.scheme.segment(0, tables[0])]
        return self.project_out_dim(hidden) if self.project_out_dim is not None else hidden

    def diagonal_weights(self):
        """The layers' weights stacked (stack_layers: built per call of the diagonal schedule)."""
        return stack_layers({"": self.layers})

    @torch.no_grad()
    def diagonal_layers(self, first: int, hs: torch.Tensor, tables, caches, assoc, weights):
        """Decoder layers first .. first+G-1, each on its own segment, as one batched call (eval mode: no
        dropout). hs G x B x N x C; tables: each segment's (diagonal_begin); caches None (no XL cache); assoc
        [A G x B x F x C, z G x B x F] or None (the segments' first) -> (hs out, None, new [A, z] or None):
        fairseq_layers.batched with each segment's mask; the scheme's read and write are forward_segment's calls,
        one per layer."""
        G, B, N, C = hs.shape
        w = {k: v[first : first + G] for k, v in weights.items()}  # G x ...
        x, states = self.scheme.read_layers(self, first, hs, assoc)
        masks = [t[1] for t in tables]
        mask = (masks[0] if all(m.dim() == 2 for m in masks) and all(m is masks[0] for m in masks)
                else torch.cat([m.expand(B, 1, N, N) for m in masks]))  # (G*B) x 1 x N x N
        x = fairseq_layers.batched(self.layers[first], w, x, mask)
        return x, None, self.scheme.write_layers(self, first, x, states, self.scheme.written(0, tables[0][0]))

    def token_log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """B x T x C -> B x T x V log-probabilities."""
        return self.get_normalized_probs((self.output_layer(hidden), None), log_probs=True).float()

    def max_positions(self):
        """Any length: every segment's tokens get positions 1..T, so fairseq's limit (the position table, the
        segment length under --task rmt_lm) would cap generation at one segment."""
        return int(1e9)

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, features_only=False, **kwargs):
        """The whole prefix through the segment loop, fresh memory (generation recomputes it every step)."""
        out = run_segments(self, prev_output_tokens, None, RecurrentState(), seg_len=self.segment_len,
                           return_hidden=True, schedule=self.inference_schedule)
        x = torch.cat(out.hidden, dim=1)  # B x t x C
        return (x if features_only else self.output_layer(x)), {"attn": [None], "inner_states": None}


@register_model("rmt_transformer_lm", dataclass=RMTTransformerLMConfig)
class RMTTransformerLanguageModel(RecurrentLM, TransformerLanguageModel):
    @classmethod
    def build_model(cls, args, task):
        # a checkpoint from before a memory field existed, a stock preset without them
        with_field_defaults(args, MemoryConfig, fill_none=True)
        validate_memory(args)
        # fairseq's adaptive modules assert on cutoffs beyond the vocabulary (a preset's, e.g. _wiki103's 20000,60000)
        input_cutoff = getattr(args, "adaptive_input_cutoff", None) if getattr(args, "adaptive_input", False) else None
        check_cutoffs(args, len(task.source_dictionary),
                      [("--adaptive-softmax-cutoff", getattr(args, "adaptive_softmax_cutoff", None)),
                       ("--adaptive-input-cutoff", input_cutoff)], up_to_vocab=True)
        model = super().build_model(args, task)  # fairseq's own transformer_lm build
        model.decoder.__class__ = RMTTransformerDecoder  # same module and weights, plus the segment interface
        model.decoder.init_memory(args)
        make_dense(model.decoder.embed_tokens)  # adaptive input: every band on every call (modules/adaptive.py)
        model.setup_from_task(args, task)
        if args.lm_path:
            load_transformer_lm(model, args.lm_path)
        threads.configure(model)  # torch's intra-op threads for a CPU run (rmt_fairseq/threads.py)
        return model

    def upgrade_state_dict_named(self, state_dict, name):
        """A transformer_lm checkpoint (--restore-file, --finetune-from-model) has no memory tokens: they keep
        this model's fresh initialisation, as fairseq's RoBERTa does for new classification heads."""
        super().upgrade_state_dict_named(state_dict, name)
        prefix = name + "." if name else ""
        for k, v in self.state_dict().items():
            if k.startswith(MEMORY_PREFIXES) and prefix + k not in state_dict:
                logger.info("%s is not in the checkpoint (a transformer_lm one?): new memory tokens", prefix + k)
                state_dict[prefix + k] = v


def load_transformer_lm(model: RMTTransformerLanguageModel, path: str) -> None:
    """--lm-path: every decoder tensor of a fairseq checkpoint into the wrapper; only the memory is new."""
    check(os.path.isfile(path), f"--lm-path {path}: no such file")
    try:
        # fairseq checkpoints of older releases keep argparse args: a full (trusted, user-given) unpickle
        state = torch.load(path, map_location="cpu", weights_only=False)
        sd = dict(state["model"])
    except Exception as e:
        raise RMTConfigError(f"--lm-path {path}: not a readable fairseq checkpoint ({type(e).__name__}: {e})") from None
    cfg = state.get("cfg") or {}
    arch = (cfg.get("model") or {}).get("_name") if isinstance(cfg, dict) else getattr(cfg.model, "_name", None)
    arch = arch or getattr(state.get("args"), "arch", None)
    family = ARCH_MODEL_REGISTRY.get(arch)
    check(family is not None and issubclass(family, TransformerLanguageModel),
          f"--lm-path {path} holds a {arch} model, not a transformer_lm one")
    check_vocabulary(sd, len(model.decoder.dictionary), f"--lm-path {path}", model.dictionary_file or "the data")
    saved_fp = (cfg.get("model") or {}).get("dictionary_fingerprint") if isinstance(cfg, dict) else None
    if saved_fp is None:  # a stock transformer_lm: compare with the dict.txt of the data it was trained on, if there
        data = ((cfg.get("task") or {}).get("data") if isinstance(cfg, dict) else None) or getattr(
            state.get("args"), "data", None)
        trained_dict = os.path.join(data.split(os.pathsep)[0], "dict.txt") if isinstance(data, str) else None
        if trained_dict and os.path.isfile(trained_dict):
            from fairseq.data import Dictionary

            saved_fp = dictionary_fingerprint(Dictionary.load(trained_dict))
        else:
            logger.warning("--lm-path %s: its training dict.txt (%s) is not there to compare token order with; only "
                           "the vocabulary size was checked", path, trained_dict)
    check_fingerprint(saved_fp, model.decoder.dictionary, f"--lm-path {path}", model.dictionary_file or "the data")
    model.upgrade_state_dict_named(sd, "")
    own = model.state_dict()
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise RMTConfigError(f"--lm-path {path}: {k} is {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} "
                                 f"in this model: use the checkpoint's architecture (--arch rmt_{arch} and its "
                                 f"--decoder-* flags)")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(MEMORY_PREFIXES)]
    if missing or unexpected:
        raise RMTConfigError(f"--lm-path {path} does not fit this model: missing {missing[:4]}, unexpected "
                             f"{unexpected[:4]} (use the checkpoint's architecture: --arch rmt_{arch})")
    logger.info("loaded the decoder of %s (%s, %d tensors); %d memory tokens are new", path, arch, len(sd),
                model.decoder.num_mem_tokens)


# ---- architectures: every transformer_lm preset of fairseq, with memory -----------------------------------


# fairseq's own preset functions (sizes, positions, adaptive softmax ...); --mem-tokens keeps its default of 10
for _name, _model in list(ARCH_MODEL_REGISTRY.items()):
    if _model is TransformerLanguageModel and _name != "transformer_lm" and f"rmt_{_name}" not in ARCH_MODEL_REGISTRY:
        register_model_architecture("rmt_transformer_lm", f"rmt_{_name}")(ARCH_CONFIG_REGISTRY[_name])


# ---- ARMT presets: every transformer_lm preset with per-layer associative memory (models/config.py ARMT_BASE) ------

register_presets("rmt_transformer_lm", {
    f"armt_{name}": (ARMT_BASE, f"fairseq's {name} preset with ARMT: 16 memory tokens, a d_mem 64 associative memory "
                                "per layer, the diagonal schedule for inference", ARCH_CONFIG_REGISTRY[name])
    for name, model in list(ARCH_MODEL_REGISTRY.items())
    if model is TransformerLanguageModel and f"armt_{name}" not in ARCH_MODEL_REGISTRY})
