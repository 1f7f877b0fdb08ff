"""The `rmt_lm` model: a Transformer-XL decoder with a memory scheme (modules/schemes.py: RMT memory tokens, MT,
a gated write, ARMT), an XL cache, both, or neither; its presets.

Legend: B batch (streams), T segment tokens, M memory tokens, L XL-cache length, C model dim, V vocabulary.

Memory modes, all from flags on the same backbone:
  --mem-tokens 0 --mem-len 0      no memory (the baseline)
  --mem-len L                     Transformer-XL: per-layer hidden states of the last L tokens, detached
  --mem-tokens M                  RMT: [read mem | segment | write mem]; write output -> next read memory
  --mem-tokens M --mem-len L      RMT + XL cache
  --memory-layout mt              the paper's MT ablation: memory tokens at the start only, no recurrence
  --memory-layout gated           RMT with a gated write (the next memory mixes the written and the read one)
  --mem-tokens M --associative-memory
                                  ARMT (Rodkin et al. 2024): [segment | write mem]; per layer an associative
                                  matrix written by the memory tokens, read by every token of the next segment
                                  (modules/associative.py); memory tokens are learned, not carried

The config and its checks are models/rmt_lm_config.py; what a checkpoint records, models/trained_with.py; the
forward every door goes through, models/recurrent_lm.py.
"""

import logging
import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from fairseq import options
from fairseq.models import FairseqIncrementalDecoder, FairseqLanguageModel, register_model
from fairseq.modules import AdaptiveSoftmax
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from rmt_fairseq import threads
from rmt_fairseq.errors import check
from rmt_fairseq.models.config import ARMT_BASE, ARMT_PRESET, cutoffs_of, register_presets, with_field_defaults
from rmt_fairseq.models.recurrent_lm import RecurrentLM, segment_nll
from rmt_fairseq.models.rmt_lm_config import RMTLanguageModelConfig, validate_config
from rmt_fairseq.modules.adaptive import DenseAdaptiveInput
from rmt_fairseq.modules.memory import Layout, LayoutCache
from rmt_fairseq.modules.recurrence import (
    DEFAULT_SEGMENT_LEN,
    RecurrentState,
    SegmentOutput,
    run_segments,
    stack_layers,
)
from rmt_fairseq.modules.relative_attention import PositionBias, RelativeDecoderLayer, StackedLayers
from rmt_fairseq.modules.schemes import SchemeModel, rows_around, scheme_from
from rmt_fairseq.modules.transformer_xl import XLAdaptiveEmbedding, XLAdaptiveLogSoftmax, init_transformer_xl_

logger = logging.getLogger(__name__)


class RMTDecoder(SchemeModel, FairseqIncrementalDecoder):
    """Transformer-XL decoder with memory tokens; implements the segment interface of modules/recurrence.py."""

    def __init__(self, cfg: RMTLanguageModelConfig, dictionary, embed_tokens: nn.Module):
        super().__init__(dictionary)
        C, H = cfg.decoder_embed_dim, cfg.decoder_attention_heads
        self.embed_dim, self.num_layers = C, cfg.decoder_layers
        self.checkpoint_activations = cfg.checkpoint_activations
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
        # the memory scheme (modules/schemes.py); its memory tokens are drawn here, its other modules below
        scheme = scheme_from(cfg)
        self.install_scheme(scheme, C, cfg.decoder_layers, cfg, names=("memory",))
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
            cutoffs = cutoffs_of(cfg)
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
        # the scheme's other modules (ARMT's blocks, the gated write's gate): built after the XL init, which must
        # not redraw them (ARMT's W_V starts at zero)
        self.install_scheme(scheme, C, cfg.decoder_layers, cfg, names=scheme.modules[1:])
        self.inference_schedule = str(getattr(cfg, "inference_schedule", "sequential"))

    @property
    def diagonal_ok(self) -> bool:
        """The diagonal schedule is exact: the scheme carries no token memory from a segment's last layer to the
        next one's first (schemes.MemoryScheme.diagonal_exact), and nothing records attention."""
        # ZeRO-3 gathers a weight only inside its own module's forward: the batched call reads them outside, so a
        # partitioned model runs sequentially
        return (self.scheme.diagonal_exact and not any(layer.attn.keep_attention for layer in self.layers)
                and not any(hasattr(p, "ds_id") for p in self.layers.parameters()))

    def layout(self, cache: int, read: int, segment: int, write: int) -> Layout:
        """The attention geometry of a segment with these block sizes under this model's switches."""
        return Layout(cache, read, segment, write, mem_cache=self.mem_cache_rule,
                      same_length=self.mem_len if self.same_length else 0, clamp_len=self.clamp_len)

    # ---- the segment interface used by modules/recurrence.py -------------------------------------------

    def _segment_input(self, tokens: torch.Tensor, memory: Optional[torch.Tensor]):
        """tokens B x T -> (h B x N x C, the first layer's input with the scheme's memory rows around the segment;
        mem_drop: LM-RMT's memory dropout; the memory read, for the scheme's carry)."""
        x = self.embed_scale * self.embed_tokens(tokens)  # B x T x C
        mem_drop = self.memory_dropout and self.num_mem_tokens > 0
        if not mem_drop:
            x = self.dropout(x)
        h, read = rows_around(self.scheme, self, x, memory)  # B x N x C
        if mem_drop:  # LM-RMT: memory is concatenated before the embedding dropout
            h = self.dropout(h)
        return h, mem_drop, read

    def _segment_output(self, h: torch.Tensor, T: int, mem_drop: bool, read: Optional[torch.Tensor]):
        """The last layer's output B x N x C -> (hidden B x T x C, the memory carried to the next segment B x M x C
        or None)."""
        seg = self.scheme.segment(0, T)
        if mem_drop:  # LM-RMT: written memory is taken after the output dropout
            h = self.dropout(h)
            hidden = h[:, seg]  # B x T x C
        else:
            hidden = self.dropout(h[:, seg])  # B x T x C
        return hidden, self.scheme.carry(self, h, self.scheme.written(0, T), read)

    def _tables(self, cache_len: int, T: int, like: torch.Tensor):
        """(pos_emb P x C, rel_index N x K, mask_bias N x K) of a segment of T tokens after cache_len cached ones,
        the scheme's memory rows around it (modules/memory.py; built once per layout)."""
        layout = self.layout(cache_len, self.scheme.before, T, self.scheme.after)
        return self.layouts.get(layout, like.device, like.dtype)

    def _layers(self, h: torch.Tensor, tables, T: int, cache=None, assoc=None, kv=None):
        """The one layer loop (a segment's forward, the diagonal schedule's begin, generation's steps): h B x N x C
        through every layer with the scheme's read before and write after each, the XL cache of each layer's
        segment rows kept. With `kv` (generation: per layer the keys and values B x H x K' x D of the rows before
        h, or None), h's rows attend to those and their own keys and values are appended to kv; nothing is written.
        -> (h, the new per-layer cache or None, the new associative state or None)."""
        pos_emb, rel_index, mask_bias = tables
        u, v = self.pos_bias()  # H x D each
        scheme = self.scheme
        new_cache = [] if scheme.mem_len > 0 and kv is None else None
        new_assoc = [] if scheme.associative and kv is None else None
        seg, written = scheme.segment(0, T), scheme.written(0, T)
        for i, layer in enumerate(self.layers):
            h = scheme.read(self, i, h, assoc)  # ARMT: every row reads layer i's associative memory
            if new_cache is not None:  # XL caches each layer's input for the segment tokens only
                new_cache.append(scheme.update_cache(cache[i] if cache is not None else None, h[:, seg]))
            layer_cache = cache[i] if cache is not None else None
            if kv is not None:
                past = kv[i]
                k_new, v_new = layer.attn.project_kv(h)
                kv[i] = (torch.cat([past[0], k_new], 2), torch.cat([past[1], v_new], 2)) if past else (k_new, v_new)
                h = layer(h, None, pos_emb, rel_index, mask_bias, u, v, past)
            elif self.checkpoint_activations and self.training and torch.is_grad_enabled():
                h = torch_checkpoint(layer, h, layer_cache, pos_emb, rel_index, mask_bias, u, v, use_reentrant=False)
            else:
                h = layer(h, layer_cache, pos_emb, rel_index, mask_bias, u, v)  # B x N x C
            if new_assoc is not None:  # ... and its memory rows write it for the next segment
                new_assoc += scheme.write(self, i, h, assoc, written)
        return h, new_cache, new_assoc

    def forward_segment(
        self, tokens: torch.Tensor, memory: Optional[torch.Tensor], cache: Optional[List[torch.Tensor]],
        assoc: Optional[List[torch.Tensor]] = None,
    ) -> SegmentOutput:
        """One segment: tokens B x T, carried memory B x M x C, XL cache per layer B x L x C, ARMT state [A_0 B x F x C,
        z_0 B x F, ...] (None at a stream's start) -> SegmentOutput with the state handed to the next segment."""
        T = tokens.size(1)
        h, mem_drop, read = self._segment_input(tokens, memory)
        L = cache[0].size(1) if cache is not None else 0
        pos_emb, rel_index, mask_bias = self._tables(L, T, h)
        h, new_cache, new_assoc = self._layers(h, (self.dropout(pos_emb), rel_index, mask_bias), T, cache, assoc)
        hidden, new_memory = self._segment_output(h, T, mem_drop, read)
        return SegmentOutput(hidden=hidden, memory=new_memory, cache=new_cache, assoc=new_assoc)

    # ---- the diagonal schedule (modules/recurrence.py): the same computation, layers batched ------------

    def diagonal_begin(self, tokens: torch.Tensor, cache_len: int):
        """tokens B x T -> (layer-0 input B x N x C, the segment's geometry)."""
        T = tokens.size(1)
        h, mem_drop, _ = self._segment_input(tokens, None)
        pos_emb, rel_index, mask_bias = self._tables(cache_len, T, h)
        return h, (T, mem_drop, self.dropout(pos_emb), rel_index, mask_bias)

    def diagonal_end(self, h: torch.Tensor, tables) -> torch.Tensor:
        return self._segment_output(h, tables[0], tables[1], None)[0]

    def diagonal_weights(self):
        """Every layer's weights stacked along a first dim of n_layers (stack_layers: built per call of the diagonal
        schedule)."""
        return stack_layers({"": self.layers})

    @torch.no_grad()
    def diagonal_layers(self, first: int, hs: torch.Tensor, tables, caches: Optional[torch.Tensor],
                        assoc: Optional[List[torch.Tensor]], weights):
        """Layers first .. first+G-1, each on its own segment, as one batched call: hs G x B x N x C; tables: each
        segment's (diagonal_begin, the same for the group); caches G x B x L x C or None; assoc [A G x B x F x C,
        z G x B x F] or None (the segments' first) -> (hs out, the segment rows of each layer's input for the XL
        cache or None, new [A, z] or None). The layer is RelativeDecoderLayer's own forward on the stacked weights
        (StackedLayers), the scheme's read and write its per-layer calls, as in _layers."""
        T, _, pos_emb, rel_index, mask_bias = tables[0]
        G = hs.size(0)
        x, states = self.scheme.read_layers(self, first, hs, assoc)
        seg_in = x[:, :, self.scheme.segment(0, T)] if self.mem_len > 0 else None
        ops = StackedLayers(self.layers[first], {k: w[first : first + G] for k, w in weights.items()})
        x = self.layers[first](x, caches, pos_emb, rel_index, mask_bias, *self.pos_bias(), ops=ops)
        return x, seg_in, self.scheme.write_layers(self, first, x, states, self.scheme.written(0, T))

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

    def _incremental_tables(self, st):
        """(L, the rows before the segment, the tables of the segment's full layout) for generation."""
        L = st["state"].cache[0].size(1) if st["state"].cache is not None else 0
        R = self.scheme.before
        w = next(self.parameters())  # the model's device and dtype (a half/bf16 model generates in half/bf16)
        return L, R, self._tables(L, self.segment_len, w)

    def _start_segment(self, st, B):
        """Keys/values of the XL cache and of the scheme's rows before the segment, per layer (rows 0..R-1)."""
        state = st["state"]
        L, R, (pos_emb, rel_index, mask_bias) = self._incremental_tables(st)
        kv = [layer.attn.project_kv(state.cache[i]) if state.cache is not None else None
              for i, layer in enumerate(self.layers)]
        before, _ = self.scheme.blocks(self, state.memory, B)  # RMT's carried memory, MT's tokens (ARMT: none)
        if before is not None:
            self._layers(before, (pos_emb, rel_index[:R, : L + R], mask_bias[:R, : L + R]), 0, kv=kv)
        st.update(kv=kv, seg=None, t=0)

    def _step(self, token, st):
        """One new token of the current segment -> its final hidden state B x C: _layers on its one row against the
        keys and values before it."""
        T = self.segment_len
        if st["t"] == T:  # the segment is complete: memory and cache through the segment loop, as in training
            run_segments(self, st["seg"], None, st["state"], seg_len=T)
            st["kv"] = None
        if st["t"] == T or st.get("kv") is None:
            self._start_segment(st, token.size(0))
        L, R, (pos_emb, rel_index, mask_bias) = self._incremental_tables(st)
        row, cols = R + st["t"], L + R + st["t"] + 1
        x = self.embed_scale * self.embed_tokens(token[:, None])  # B x 1 x C
        x, _, _ = self._layers(x, (pos_emb, rel_index[row : row + 1, :cols], mask_bias[row : row + 1, :cols]), 0,
                               assoc=st["state"].assoc, kv=st["kv"])
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


@register_model("rmt_lm", dataclass=RMTLanguageModelConfig)
class RMTLanguageModel(RecurrentLM, FairseqLanguageModel):
    def __init__(self, decoder: RMTDecoder, cfg: RMTLanguageModelConfig):
        super().__init__(decoder)
        self.cfg = cfg

    @classmethod
    def build_model(cls, cfg: RMTLanguageModelConfig, task):
        cfg = with_field_defaults(cfg, RMTLanguageModelConfig)  # a checkpoint from before a field existed
        validate_config(cfg, len(task.source_dictionary))
        dictionary = task.source_dictionary
        C = cfg.decoder_embed_dim
        if str(cfg.embedding_impl) == "transformer_xl":
            cutoffs = cutoffs_of(cfg)
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


# ---- architectures: size presets, one table; every field stays overridable on the command line ---------------


def _segment_flag(args, values) -> None:
    """tokens_per_sample is rmt_lm's segment length (a task flag: the argparse namespace is flat). Under other tasks
    (fairseq's language_modeling) --tokens-per-sample is the sample and the preset's segment length is the
    per-sample --segment-len. (fairseq calls a preset again on the model's own config, which has no `task`: there
    segment_len is set too, and ignored under --task rmt_lm.)"""
    if getattr(args, "task", None) != "rmt_lm":
        values["segment_len"] = values.pop("tokens_per_sample", None)


# The authors' Transformer-XL conventions (LM-RMT pytorch/train.py defaults, the same as kimiyoung/transformer-xl):
# XL's weights_init, dropout inside the FFN, XL's adaptive embedding and softmax. Every value is checked against
# the authors' scripts by tests/models/test_paper_presets.py; examples/*/README.md list them side by side.
XL_CONVENTIONS = dict(init="normal", init_std=0.02, init_range=0.1, proj_init_std=0.01,
                      embedding_impl="transformer_xl")
WT103 = dict(XL_CONVENTIONS, decoder_layers=16, decoder_embed_dim=410, decoder_attention_heads=10, decoder_head_dim=41,
             decoder_ffn_embed_dim=2100, dropout=0.1, attention_dropout=0.0, activation_dropout=0.1, mem_tokens=10,
             mem_len=0, adaptive_softmax_cutoff="20000,40000,200000", div_val=1, adaptive_softmax_factor=1.0,
             adaptive_input=True, adaptive_input_factor=1.0, tie_adaptive_weights=True, tie_adaptive_proj=True,
             tokens_per_sample=150)
ENWIK8 = dict(XL_CONVENTIONS, decoder_layers=12, decoder_embed_dim=512, decoder_attention_heads=8, decoder_head_dim=64,
              decoder_ffn_embed_dim=2048, dropout=0.1, attention_dropout=0.0, activation_dropout=0.1, mem_tokens=10,
              mem_len=0, share_decoder_input_output_embed=True, tokens_per_sample=512)
TINY = dict(decoder_layers=2, decoder_embed_dim=64, decoder_attention_heads=2, decoder_ffn_embed_dim=128, dropout=0.0,
            attention_dropout=0.0, mem_tokens=4, mem_len=0, share_decoder_input_output_embed=True,
            tokens_per_sample=32)

PRESETS = {
    "rmt_wt103": (WT103, "Transformer-XL base for WikiText-103 (Dai et al. 2019; LM-RMT pytorch/run_wt103_base.sh) "
                  "with 10 memory tokens; segment 150: 16 layers, C 410, 10 heads of 41, FFN 2100, dropout 0.1 (in the "
                  "FFN too), dropatt 0, adaptive input and softmax with cutoffs 20000/40000/200000, div_val 1, tied."),
    "rmt_enwik8": (ENWIK8, "Transformer-XL 12-layer enwik8 model (LM-RMT pytorch/run_enwik8_base.sh) with 10 memory "
                   "tokens; segment 512, byte vocabulary: 12 layers, C 512, 8 heads of 64, FFN 2048, dropout 0.1 (in "
                   "the FFN too), dropatt 0, a tied softmax with a bias."),
    "transformer_xl_wt103": (dict(WT103, mem_tokens=0, mem_len=150),
                             "The same backbone as rmt_wt103 as plain Transformer-XL: cache of 150, no memory tokens."),
    "transformer_xl_enwik8": (dict(ENWIK8, mem_tokens=0, mem_len=512),
                              "The same backbone as rmt_enwik8 as plain Transformer-XL: cache of 512, no memory "
                              "tokens."),
    "rmt_tiny": (TINY, "2 layers, C=64: for tests and the CPU demo."),
    # ARMT (Rodkin et al. 2024): the same backbones with per-layer associative memory (models/config.py ARMT_*)
    "armt_tiny": (dict(TINY, **ARMT_PRESET, mem_tokens=8, d_mem=32),
                  "rmt_tiny with ARMT: 2 layers, C=64, 8 memory tokens writing a d_mem 32 associative memory per "
                  "layer (chosen on validation, examples/custom-corpus)."),
    "armt_wt103": (dict(WT103, **ARMT_BASE), "rmt_wt103's Transformer-XL base with ARMT: 16 memory tokens, d_mem 64 "
                   "per layer; segment 150."),
    "armt_enwik8": (dict(ENWIK8, **ARMT_BASE), "rmt_enwik8's 12-layer model with ARMT: 16 memory tokens, d_mem 64 "
                    "per layer; segment 512."),
    # RMT with a gated write (modules/schemes.py GatedRMT)
    "rmt_gated_tiny": (dict(TINY, memory_layout="gated"), "rmt_tiny with a gated write: the next memory mixes the "
                       "written and the read memory through a learned update gate."),
}
register_presets("rmt_lm", PRESETS, adjust=_segment_flag)
