"""The `rmt_encoder` model: fairseq's RoBERTa-style TransformerEncoder with RMT memory at the start of every
segment and a classification head on the final segment ("Scaling Transformer to 1M tokens", §2).

Legend: B documents, T segment tokens, M memory tokens, N = 2 + M + T positions, C model dim, V classes.

One segment's input is [<s> | memory (M) | segment tokens (T) | </s>]. Attention is bidirectional over all of
it (fairseq's encoder, pad keys masked): every token sees the memory and the whole segment, and the memory
sees the segment. The same M slots are read and written: their final-layer outputs are the next segment's
memory, entered at the embedding layer in place of the memory tokens' embeddings (so they get the memory
positions' embeddings and the embedding layer norm, as the authors' RMT-BERT does). Positions follow
RoBERTa's: <s> first, memory next, then the segment, </s> after its last real token.

ARMT (--associative-memory): the memory tokens are learned and not carried; before every layer each row reads
that layer's associative memory, and the layer's output at the memory rows writes it for the next segment
(modules/associative.py; W_V starts at zero, so until it learns the encoder computes what it computes without).
Without gradients, --inference-schedule diagonal runs an ARMT (or memoryless) encoder's (segment, layer) grid by
anti-diagonals (modules/recurrence.py), fairseq's encoder layers batched as stacked weights (diagonal_layers).

The encoder's weights and key names are RoBERTa's (`encoder.sentence_encoder.*`): `--roberta-path` starts it
from a fairseq RoBERTa checkpoint (its LM head is dropped; memory and classification head start fresh).
"""

import argparse
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from fairseq.models import FairseqEncoder, FairseqEncoderModel, register_model
from fairseq.models.roberta.model import RobertaClassificationHead
from fairseq.models.roberta.model import base_architecture as roberta_defaults
from fairseq.models.transformer import TransformerEncoder
from fairseq.modules.transformer_sentence_encoder import init_bert_params
from omegaconf import II
from torch import nn

from rmt_fairseq import threads
from rmt_fairseq.data.documents import IGNORE
from rmt_fairseq.errors import RMTConfigError, check
from rmt_fairseq.models.config import (
    ARMT_BASE,
    ARMT_PRESET,
    MemoryConfig,
    TrainedWithConfig,
    register_presets,
    validate_memory,
)
from rmt_fairseq.models.trained_with import check_or_record_dictionary, data_dictionary_file
from rmt_fairseq.modules import fairseq_layers
from rmt_fairseq.modules.recurrence import RecurrentState, SegmentOutput, run_segments, stack_layers
from rmt_fairseq.modules.schemes import SchemeModel, scheme_from

logger = logging.getLogger(__name__)


@dataclass
class RMTEncoderConfig(MemoryConfig, TrainedWithConfig):
    """The RoBERTa encoder's flags; memory and provenance fields are shared (models/config.py)."""

    encoder_layers: int = field(default=12, metadata={"help": "number of encoder layers"})
    encoder_embed_dim: int = field(default=768, metadata={"help": "model dimension C"})
    encoder_ffn_embed_dim: int = field(default=3072, metadata={"help": "feed-forward inner dimension"})
    encoder_attention_heads: int = field(default=12, metadata={"help": "attention heads (C must divide by it)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on embeddings and residuals"})
    attention_dropout: float = field(default=0.1, metadata={"help": "dropout on attention weights"})
    activation_dropout: float = field(default=0.0, metadata={"help": "dropout inside the feed-forward block"})
    pooler_dropout: float = field(default=0.0, metadata={"help": "dropout in the classification head"})
    activation_fn: str = field(default="gelu", metadata={"help": "feed-forward activation (RoBERTa: gelu)"})
    pooler_activation_fn: str = field(default="tanh", metadata={"help": "classification head activation"})
    max_positions: int = field(
        default=512, metadata={"help": "learned positions; one segment uses --tokens-per-sample + --mem-tokens + 2"}
    )
    encoder_normalize_before: bool = field(
        default=False, metadata={"help": "pre-norm layers (RoBERTa: post-norm, with an embedding layer norm)"}
    )
    roberta_path: Optional[str] = field(
        default=None,
        metadata={"help": "initialise the encoder from this fairseq RoBERTa checkpoint (model.pt); memory and "
                  "classification head start fresh. Needs the checkpoint's dict.txt as the data's dict.txt"},
    )
    tokens_per_sample: Optional[int] = II("task.tokens_per_sample")


class RMTEncoder(SchemeModel, FairseqEncoder):
    """RoBERTa encoder + memory + head; implements the segment interface of modules/recurrence.py."""

    padding_idx = IGNORE  # the segment loop's "not scored" target value; the token pad is self.pad

    def __init__(self, cfg: RMTEncoderConfig, dictionary, num_classes: int):
        super().__init__(dictionary)
        args = argparse.Namespace(**{k: getattr(cfg, k) for k in [
            "encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_attention_heads", "dropout",
            "attention_dropout", "activation_dropout", "pooler_dropout", "activation_fn", "pooler_activation_fn",
            "max_positions", "encoder_normalize_before"]})
        roberta_defaults(args)  # the rest of RoBERTa's architecture (learned positions, embedding layer norm ...)
        C = args.encoder_embed_dim
        self.pad, self.bos, self.eos = dictionary.pad(), dictionary.bos(), dictionary.eos()
        embed_tokens = nn.Embedding(len(dictionary), C, self.pad)
        self.sentence_encoder = TransformerEncoder(args, dictionary, embed_tokens)
        self.sentence_encoder.apply(init_bert_params)
        # the memory scheme (modules/schemes.py), bidirectional: memory in its own slots after <s>, read and
        # written there; its memory tokens drawn here, its other modules after the head (the order they always had)
        scheme = scheme_from(cfg, causal=False)
        self.install_scheme(scheme, C, args.encoder_layers, cfg, init_std=0.02, names=("memory",))
        self.classification_head = RobertaClassificationHead(C, C, num_classes, args.pooler_activation_fn,
                                                             args.pooler_dropout)
        self.install_scheme(scheme, C, args.encoder_layers, cfg, names=scheme.modules[1:])
        self.inference_schedule = str(getattr(cfg, "inference_schedule", "sequential"))
        self.segment_len = self.trained_segment_len = None  # set by the build (trained_with)

    # ---- the segment interface used by modules/recurrence.py -------------------------------------------

    def _segment_input(self, tokens: torch.Tensor, memory: Optional[torch.Tensor]):
        """tokens B x T -> (src B x N: [<s> | M slots | tokens | </s>] ids, their embeddings B x N x C with the
        scheme's memory in the slots, before the encoder's embed scale; the memory read)."""
        B, T = tokens.shape
        M = self.num_mem_tokens
        bos = tokens.new_full((B, 1), self.bos)
        # the memory slots' ids only make them non-pad (so they get positions and are attended to); their
        # embeddings are replaced below
        src = torch.cat([bos, tokens.new_full((B, M), self.bos), tokens, tokens.new_full((B, 1), self.eos)],
                        dim=1)  # B x N
        emb = self.sentence_encoder.embed_tokens(src)  # B x N x C
        mem, _ = self.scheme.blocks(self, memory, B)  # B x M x C (bidirectional: every scheme's rows are before)
        if mem is not None:
            # divided by the embedding scale the encoder multiplies with (1 for RoBERTa)
            emb = torch.cat([emb[:, :1], mem / self.sentence_encoder.embed_scale, emb[:, 1 + M :]], dim=1)
        return src, emb, mem

    def forward_segment(self, tokens: torch.Tensor, memory: Optional[torch.Tensor], cache=None,
                        assoc=None) -> SegmentOutput:
        """tokens B x T (pad after a document's end) -> features B x N x C and the memory it writes (RMT), or the
        associative state [A_0 B x F x C, z_0 B x F, ...] it writes (ARMT, reading `assoc`)."""
        src, emb, read_mem = self._segment_input(tokens, memory)
        scheme, written = self.scheme, self.scheme.written(1, tokens.size(1))  # the slots after <s>
        new_assoc, hooks = [], []
        if scheme.associative:  # per layer, for this call only: the scheme's read before the layer, write after it
            for i, layer in enumerate(self.sentence_encoder.layers):

                def read(module, args, kwargs, i=i):  # args[0]: N x B x C
                    return (scheme.read(self, i, args[0].transpose(0, 1), assoc).transpose(0, 1), *args[1:]), kwargs

                def write(module, args, output, i=i):
                    x = output[0] if isinstance(output, tuple) else output  # N x B x C
                    new_assoc.extend(scheme.write(self, i, x.transpose(0, 1), assoc, written))

                hooks += [layer.register_forward_pre_hook(read, with_kwargs=True),
                          layer.register_forward_hook(write)]
        try:
            # what TransformerEncoder.forward calls, without its module call: hooks on a module whose output is a
            # dict of lists (fairseq's NanDetector, run when gradients are non-finite) make torch raise
            # StopIteration, which hid fairseq's "gradients are Nan/Inf" and the detector's report
            out = self.sentence_encoder.forward_scriptable(src, token_embeddings=emb)
        finally:
            for h in hooks:
                h.remove()
        x = out["encoder_out"][0].transpose(0, 1)  # T x B x C -> B x N x C
        return SegmentOutput(hidden=x, memory=scheme.carry(self, x, written, read_mem), cache=None,
                             assoc=new_assoc if scheme.associative else None)

    # ---- the diagonal schedule (modules/recurrence.py): the same computation, layers batched ------------


    @property
    def num_layers(self) -> int:
        return len(self.sentence_encoder.layers)

    @property
    def diagonal_ok(self) -> bool:
        """Exact for schemes carrying no token memory (schemes.MemoryScheme.diagonal_exact: ARMT, MT, none): layer l
        of a segment needs only layer l of the one before. Not under ZeRO-3, whose partitioned weights are there
        only inside their module's forward."""
        layers = self.sentence_encoder.layers
        return (self.scheme.diagonal_exact and all(fairseq_layers.plain(layer) for layer in layers)
                and not any(hasattr(p, "ds_id") for p in layers.parameters()))

    def diagonal_begin(self, tokens: torch.Tensor, cache_len: int):
        """tokens B x T -> (the first layer's input B x N x C, the segment's key padding B x N bool or None), as
        fairseq's TransformerEncoder.forward computes them."""
        se = self.sentence_encoder
        src, emb, _ = self._segment_input(tokens, None)
        pad = src.eq(se.padding_idx)  # B x N
        x, _ = se.forward_embedding(src, emb)
        x = x * (1 - pad.unsqueeze(-1).type_as(x))
        return x, (pad if bool(pad.any()) else None)

    def diagonal_end(self, h: torch.Tensor, tables) -> torch.Tensor:
        """The encoder's final layer norm (pre-norm encoders), as forward_segment: B x N x C."""
        ln = self.sentence_encoder.layer_norm
        return ln(h) if ln is not None else h

    def diagonal_weights(self):
        """The layers' weights stacked (stack_layers: built per call of the diagonal schedule)."""
        return stack_layers({"": self.sentence_encoder.layers})

    @torch.no_grad()
    def diagonal_layers(self, first: int, hs: torch.Tensor, tables, caches, assoc, weights):
        """Encoder layers first .. first+G-1, each on its own segment, as one batched call (eval mode: no dropout).
        hs G x B x N x C; tables: each segment's key padding (diagonal_begin); caches None (no XL cache); assoc
        [A G x B x F x C, z G x B x F] or None (the segments' first) -> (hs out, None, new [A, z] or None):
        fairseq_layers.batched with the padded keys masked; the scheme's read and write are forward_segment's
        calls, one per layer."""
        G, B, N, C = hs.shape
        layers = self.sentence_encoder.layers
        w = {k: v[first : first + G] for k, v in weights.items()}  # G x ...
        x, states = self.scheme.read_layers(self, first, hs, assoc)
        mask = None
        if any(t is not None for t in tables):
            keep = torch.stack([~t if t is not None else torch.ones(B, N, dtype=torch.bool, device=x.device)
                                for t in tables])  # G x B x N: True = a key to attend to
            mask = keep.reshape(G * B, 1, 1, N)
        x = fairseq_layers.batched(layers[first], w, x, mask)
        return x, None, self.scheme.write_layers(self, first, x, states, self.scheme.written(1, 0))

    def classify(self, hidden: torch.Tensor) -> torch.Tensor:
        """features B x N x C -> logits B x V (the head reads <s>, as RoBERTa's)."""
        return self.classification_head(hidden)

    def segment_loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy (nats, fp32) of the documents whose last segment this is: their label sits in
        target[:, 0], every other target is IGNORE (data/documents.py)."""
        return F.cross_entropy(self.classify(hidden).float(), target[:, 0], ignore_index=IGNORE, reduction="sum")

    def forward(self, src_tokens, segment_len: Optional[int] = None, target=None, bptt_unroll=None,
                checkpoint_segments=False, rmt_state: Optional[RecurrentState] = None, **kwargs):
        """src_tokens B x S*T, memory fresh per document, or continued from `rmt_state` (a RecurrentState the caller
        keeps, updated in place: a document streamed in chunks, as rmt-extrapolate-classify reads it).

        Without target: logits B x V, each from its document's last non-empty segment. With target B x S*T (the
        label at the first position of a document's last segment, IGNORE elsewhere; the criterion's path):
        (summed NLL per segment, fp32 S; extra) with extra["ndocs"] (labelled documents) and extra["preds"]
        (B: the predicted class of each labelled document, -1 for the others and under checkpoint_segments,
        which keeps no hidden states). segment_len: tokens per segment (default: the task's, set at the build)."""
        T = int(segment_len or self.segment_len)
        if target is None:
            logits = []
            state = rmt_state if rmt_state is not None else RecurrentState()
            run_segments(self, src_tokens, None, state, seg_len=T, schedule=self.inference_schedule,
                         on_segment=lambda s, out: logits.append(self.classify(out.hidden)))
            n_seg = ((src_tokens.ne(self.pad).sum(1) + T - 1) // T).clamp(min=1)  # B
            logits = torch.stack(logits, dim=1)  # B x S x V
            return logits[torch.arange(src_tokens.size(0)), n_seg - 1]
        doc, pos = target.ne(IGNORE).nonzero(as_tuple=True)  # one label per document, at its last segment
        last = pos // T
        preds = torch.full((src_tokens.size(0),), -1, dtype=torch.long, device=src_tokens.device)

        def keep(s, out):  # predictions of the documents ending in segment s (not under checkpointing)
            rows = doc[last == s]
            if out.hidden is not None and len(rows):
                preds[rows] = self.classify(out.hidden[rows].detach()).argmax(-1)

        out = run_segments(self, src_tokens, target, RecurrentState(), seg_len=T, bptt_unroll=bptt_unroll,
                           checkpoint_segments=checkpoint_segments, on_segment=keep, schedule=self.inference_schedule)
        return torch.stack(out.losses), {"ndocs": out.ntokens, "preds": preds}

    def max_positions(self):
        return None  # any number of segments


@register_model("rmt_encoder", dataclass=RMTEncoderConfig)
class RMTEncoderModel(FairseqEncoderModel):
    @classmethod
    def build_model(cls, cfg: RMTEncoderConfig, task, from_checkpoint: bool = False):
        validate_config(cfg, task)
        encoder = RMTEncoder(cfg, task.source_dictionary, task.num_classes)
        if cfg.roberta_path and not from_checkpoint:
            load_roberta(encoder, cfg.roberta_path, cfg,
                         data_dictionary_file(getattr(task.cfg, "data", None)) or "the data's dict.txt")
        model = cls(encoder)
        model.trained_with = trained_with(cfg, task, encoder)
        threads.configure(model)  # torch's intra-op threads for a CPU run (rmt_fairseq/threads.py)
        return model

    def forward(self, src_tokens, segment_len: Optional[int] = None, **kwargs):
        """See RMTEncoder.forward: the one door for training, validation and inference."""
        return self.encoder(src_tokens, segment_len=segment_len, **kwargs)

    def max_positions(self):
        return None


def trained_with(cfg: RMTEncoderConfig, task, encoder: RMTEncoder) -> dict:
    """What the encoder records when built for training (written into the config fairseq saves by
    rmt_fairseq/compat.py, as for the LM families): the dictionary's fingerprint and the segment length. A model
    built from a checkpoint is checked against the data's dict.txt (one line naming both) and runs at the task's
    segment length (the checkpoint's own task config unless a tool gives --tokens-per-sample), with a warning when
    that is not the trained one. -> the values to record (none for a checkpoint that has them)."""
    dict_file = data_dictionary_file(getattr(task.cfg, "data", None))
    record = check_or_record_dictionary(cfg, task.source_dictionary, dict_file)
    T, trained = int(task.cfg.tokens_per_sample), getattr(cfg, "trained_segment_len", None)
    if trained is None:
        record["trained_segment_len"] = T
    elif T != trained:
        logger.warning("segment length %d (--tokens-per-sample), not the %d the model was trained with: this run uses "
                       "%d", T, trained, T)
    encoder.segment_len, encoder.trained_segment_len = T, trained or T
    return record


def validate_config(cfg: RMTEncoderConfig, task) -> None:
    for flag, value, low in [("--encoder-layers", cfg.encoder_layers, 1),
                             ("--encoder-embed-dim", cfg.encoder_embed_dim, 1),
                             ("--encoder-attention-heads", cfg.encoder_attention_heads, 1)]:
        check(value >= low, f"{flag} must be >= {low}, got {value}")
    validate_memory(cfg)
    check(cfg.encoder_embed_dim % cfg.encoder_attention_heads == 0,
          f"--encoder-embed-dim {cfg.encoder_embed_dim} is not divisible by --encoder-attention-heads "
          f"{cfg.encoder_attention_heads}")
    T = task.cfg.tokens_per_sample
    check(T + cfg.mem_tokens + 2 <= cfg.max_positions,
          f"a segment needs --tokens-per-sample {T} + --mem-tokens {cfg.mem_tokens} + 2 (<s>, </s>) = "
          f"{T + cfg.mem_tokens + 2} positions but --max-positions is {cfg.max_positions}: lower "
          f"--tokens-per-sample to {cfg.max_positions - cfg.mem_tokens - 2}")
    if cfg.roberta_path:
        check(os.path.isfile(cfg.roberta_path), f"--roberta-path {cfg.roberta_path}: no such file")


def load_roberta(encoder: RMTEncoder, path: str, cfg: RMTEncoderConfig, dict_file: str = "the data's dict.txt") -> None:
    """Copy a fairseq RoBERTa checkpoint's encoder (`encoder.sentence_encoder.*`, or the older `decoder.*` /
    `emb_layer_norm` names) into `encoder.sentence_encoder`; every weight must fit exactly. Where the checkpoint's
    own dict.txt lies beside it (fairseq's roberta.base/ layout), the data's dictionary must list the same tokens
    in the same order (a task may append symbols such as <mask>)."""
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), "dict.txt")
    if os.path.isfile(beside):
        from fairseq.data import Dictionary

        theirs = Dictionary.load(beside).symbols
        mine = encoder.dictionary.symbols
        differ = next((i for i, (a, b) in enumerate(zip(theirs, mine)) if a != b), None)
        check(differ is None and len(mine) >= len(theirs),
              f"--roberta-path {path} was trained with {beside}, which differs from {dict_file} ("
              + (f"token {differ}: {theirs[differ]!r} vs {mine[differ]!r}" if differ is not None
                 else f"{len(theirs)} vs {len(mine)} types") + "): use the checkpoint's dict.txt as the data's")
    try:
        # fairseq RoBERTa checkpoints keep their argparse args: a full (trusted, user-given) unpickle
        state = torch.load(path, map_location="cpu", weights_only=False)
        sd = state["model"]
    except Exception as e:
        raise RMTConfigError(f"--roberta-path {path}: not a readable fairseq checkpoint ({type(e).__name__}: "
                             f"{e})") from None
    backbone = {}
    for k, v in sd.items():
        k = k.replace(".emb_layer_norm.", ".layernorm_embedding.")
        for prefix in ("encoder.sentence_encoder.", "decoder.sentence_encoder."):
            if k.startswith(prefix):
                backbone[k[len(prefix) :]] = v
    if not backbone:
        raise RMTConfigError(f"--roberta-path {path}: no encoder.sentence_encoder.* weights (is it a RoBERTa "
                             f"checkpoint?)")
    target = encoder.sentence_encoder
    # fairseq's upgrade looks keys up as f"{name}.{key}": with name "" it would find none of them and add a stray
    # ".version" key (an "unexpected" key below), so upgrade under a real prefix and strip it again
    prefixed = {f"sentence_encoder.{k}": v for k, v in backbone.items()}
    target.upgrade_state_dict_named(prefixed, "sentence_encoder")
    backbone = {k[len("sentence_encoder.") :]: v for k, v in prefixed.items()}
    own = target.state_dict()
    hints = {"embed_tokens.weight": f"{dict_file} holds another number of types than the checkpoint's dictionary; "
                                    f"binarize the data with the checkpoint's dict.txt",
             "embed_positions.weight": "set --max-positions to the checkpoint's"}
    for k, v in backbone.items():
        if k in own and own[k].shape != v.shape:
            if k in hints and v.shape[1:] == own[k].shape[1:]:  # only the number of rows differs
                hint = hints[k]
            else:
                hint = ("set --encoder-layers/--encoder-embed-dim/--encoder-ffn-embed-dim/"
                        "--encoder-attention-heads to the checkpoint's")
            raise RMTConfigError(f"--roberta-path {path}: {k} is {tuple(v.shape)} in the checkpoint, "
                                 f"{tuple(own[k].shape)} in this model: {hint}")
    missing, unexpected = target.load_state_dict(backbone, strict=False)
    missing = [k for k in missing if not k.endswith("version")]
    if missing or unexpected:
        raise RMTConfigError(f"--roberta-path {path} does not fit this encoder: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]} (check --encoder-layers and "
                             f"--encoder-normalize-before against the checkpoint's)")
    logger.info("initialised the encoder from %s (%d tensors); memory and classification head are new",
                path, len(backbone))


# ---- architectures: size presets, one table; every field stays overridable on the command line ---------------

BASE = dict(encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=3072, encoder_attention_heads=12,
            max_positions=512, mem_tokens=10)
LARGE = dict(encoder_layers=24, encoder_embed_dim=1024, encoder_ffn_embed_dim=4096, encoder_attention_heads=16,
             max_positions=512, mem_tokens=10)
TINY = dict(encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128, encoder_attention_heads=2,
            max_positions=128, mem_tokens=4, dropout=0.0, attention_dropout=0.0)

PRESETS = {
    "rmt_encoder_base": (BASE, "RoBERTa-base (12 x 768, 512 positions) with 10 memory tokens (the 1M-token report used "
                         "BERT-base)."),
    "rmt_encoder_large": (LARGE, "RoBERTa-large (24 x 1024) with 10 memory tokens."),
    "rmt_encoder_tiny": (TINY, "2 layers, C=64, 4 memory tokens: for tests and CPU benchmarks."),
    "armt_encoder_base": (dict(BASE, **ARMT_BASE), "rmt_encoder_base with ARMT: 16 memory tokens writing a d_mem 64 "
                          "associative memory per layer; the diagonal schedule for inference."),
    "armt_encoder_tiny": (dict(TINY, **ARMT_PRESET, d_mem=16), "rmt_encoder_tiny with ARMT: 4 memory tokens, d_mem 16; "
                          "the diagonal schedule for inference."),
}
register_presets("rmt_encoder", PRESETS)
