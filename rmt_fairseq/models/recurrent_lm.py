"""What both LM families (rmt_lm, rmt_transformer_lm) share: `RecurrentLM`, the one forward every caller goes
through and the recurrence set up from the task (segment length and where it comes from, per-sample checks);
`StreamStates`, fairseq-eval-lm's per-model recurrent state; `segment_nll`, a segment's loss.

Legend: B batch (streams), S segments, T segment tokens, C model dim, V vocabulary.
"""

import logging
from typing import Optional

import torch
import torch.nn.functional as F

from rmt_fairseq.errors import RMTConfigError, check
from rmt_fairseq.models.config import ARMT_MEMORY_RESET_INTERVAL
from rmt_fairseq.models.trained_with import check_or_record_dictionary, check_vocabulary, data_dictionary_file
from rmt_fairseq.modules.adaptive import adaptive_softmax_nll
from rmt_fairseq.modules.recurrence import DEFAULT_SEGMENT_LEN, RecurrentState, run_segments
from rmt_fairseq.modules.transformer_xl import XLAdaptiveLogSoftmax

logger = logging.getLogger(__name__)


def eval_context_window(task_cfg) -> int:
    """fairseq-eval-lm's --context-window, read from the run's config that the task's config belongs to (fairseq
    keeps the parent of a merged task config); 0 for every other tool and for a task config without one."""
    try:
        root = task_cfg._get_parent()
    except AttributeError:
        return 0
    evaluation = getattr(root, "eval_lm", None) if root is not None else None
    return int(getattr(evaluation, "context_window", 0) or 0)


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
        self.dictionary_file = data_dictionary_file(getattr(task_cfg, "data", None))
        # what the model is trained with travels in its config (saved in every checkpoint): recorded here when
        # built for training (rmt_fairseq.compat writes it into the config fairseq saves), checked / used when a
        # checkpoint's config comes back
        self.trained_with = {}
        dictionary = getattr(task, "source_dictionary", None)
        if dictionary is not None and hasattr(dictionary, "symbols"):
            self.trained_with.update(check_or_record_dictionary(cfg, dictionary, self.dictionary_file))
        self.per_sample = not getattr(task, "stream_level", False)
        self.segment_bptt_unroll = getattr(cfg, "segment_bptt_unroll", None)
        if self.segment_bptt_unroll is not None:
            check(self.segment_bptt_unroll >= 0, f"--segment-bptt-unroll must be >= 0, got {self.segment_bptt_unroll}")
        T = self._segment_len_from(cfg, task, task_cfg)
        self.decoder.segment_len = T
        self.memory_reset_interval = None if self.per_sample else self._reset_interval_from(cfg, task_cfg)
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

    def _reset_interval_from(self, cfg, task_cfg) -> Optional[int]:
        """Segments after which a stream's memory starts afresh, for every door (the forward applies it: training,
        validation, fairseq-eval-lm, the hub), None for never. Under --task rmt_lm only (other stream-level tasks
        start every sample fresh). Built for training: --memory-reset-interval (0: never), not given ARMT's
        default for an associative model, recorded in the model's config (`trained_memory_reset_interval`);
        loaded from a checkpoint: what it was trained with, unless --memory-reset-interval is given."""
        if not hasattr(task_cfg, "memory_reset_interval"):
            return None
        given = task_cfg.memory_reset_interval
        trained = getattr(cfg, "trained_memory_reset_interval", None)
        if trained is None:  # built for training (or a checkpoint from before the field): recorded
            R = given if given is not None else \
                (ARMT_MEMORY_RESET_INTERVAL if getattr(self.decoder, "associative", False) else 0)
            self.trained_with["trained_memory_reset_interval"] = R
        else:
            R = given if given is not None else trained
            if R != trained:
                every = lambda n: f"every {n} segments" if n else "never"  # noqa: E731
                logger.warning("--memory-reset-interval %d: streams restart their memory %s, where training "
                               "restarted them %s", R, every(R), every(trained))
        return R or None

    def _check_sample_length(self, T: int, cfg, task, task_cfg) -> None:
        """Per-sample recurrence: a sample (--tokens-per-sample S of the task) is whole segments; under
        fairseq-eval-lm --context-window C each scored block is C context tokens + S - C new ones, so C is whole
        segments too (the scored tokens then sit where they would in a sample without context)."""
        S = getattr(task_cfg, "tokens_per_sample", None)  # the task's sample length
        name = type(task).__name__
        context = eval_context_window(task_cfg)
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
        described = self.decoder.scheme.describe(self.decoder) if hasattr(self.decoder, "scheme") else None
        logger.info("per-sample recurrence (%s): segments of %d tokens, memory fresh per sample: %s", name, T,
                    described or "no memory tokens (--mem-tokens 0)")

    def forward(self, src_tokens, src_lengths=None, segment_len: Optional[int] = None, target=None,
                rmt_state=None, bptt_unroll: Optional[int] = None, bptt_mode: str = "block",
                checkpoint_segments: bool = False, on_segment=None, **kwargs):
        """Run src_tokens B x S*T through the segment loop (modules/recurrence.py).

        rmt_state: the streams' RecurrentState (stream-level tasks; updated and returned, moved to the model's
        device and dtype first), a StreamStates (fairseq-eval-lm: one state per model of an ensemble), or None
        (fresh memory). Per-sample models ignore it and start every sample fresh.

        Without target: (logits B x S*T x V, or the features with an adaptive softmax; extra) as fairseq's
        decoders return, extra["rmt_state"] the updated state. With target B x S*T (the criteria): (summed NLL
        per scored segment, fp32 S; extra) with extra["ntokens"] (scored targets), extra["memory_ok"] (bool S:
        whether the memory each segment wrote is finite; device tensor, no host sync) and extra["rmt_state"].
        bptt_unroll / bptt_mode / checkpoint_segments: truncation and recomputation (stream-level; per-sample
        models use --segment-bptt-unroll). on_segment(s, SegmentOutput): called after each segment (a tool's view
        of the hidden states, e.g. rmt-plot-attention)."""
        if self.per_sample:
            state, bptt_unroll, bptt_mode = RecurrentState(), self.segment_bptt_unroll, "block"
        elif isinstance(rmt_state, StreamStates):
            state = rmt_state.for_model(self)
        else:
            state = rmt_state if rmt_state is not None else RecurrentState()
        R = getattr(self, "memory_reset_interval", None)  # None for per-sample models (setup_from_task)
        if R and state.segments_seen >= R:
            state.reset()  # the streams restart where training restarted them (_reset_interval_from)
        param = next(self.parameters())
        # a resumed / exported state joins the model's device and dtype (ARMT's state: its own dtype)
        state.to(src_tokens.device, param.dtype, getattr(self.decoder, "assoc_dtype", None) or param.dtype)
        seg_len = int(segment_len or self.decoder.segment_len)
        schedule = getattr(self.decoder, "inference_schedule", "sequential")
        if target is None:
            out = run_segments(self.decoder, src_tokens, None, state, seg_len=seg_len, bptt_unroll=bptt_unroll,
                               return_hidden=True, schedule=schedule, on_segment=on_segment)
            features = torch.cat(out.hidden, dim=1)  # B x S*T x C
            return self.decoder.output_layer(features), {"attn": None, "inner_states": None, "rmt_state": state}
        memory_ok = []  # per segment: is the memory it writes finite (device tensors: no sync here)

        def check_memory(s, o):  # RMT's memory tokens and ARMT's associative state
            written = ([o.memory] if o.memory is not None else []) + list(o.assoc or [])
            if written:
                memory_ok.append(torch.stack([torch.isfinite(t).all() for t in written]).all())
            if on_segment is not None:
                on_segment(s, o)

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
