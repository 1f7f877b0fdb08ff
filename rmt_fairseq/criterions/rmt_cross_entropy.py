"""`rmt_cross_entropy`: cross-entropy over every segment of a batch, run through the segment loop with the
task's recurrent state and truncated BPTT (modules/recurrence.py)."""

import logging
import math
from dataclasses import dataclass, field

import torch
from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from rmt_fairseq.errors import RMTRunError
from rmt_fairseq.modules.recurrence import RecurrentState

logger = logging.getLogger(__name__)


@dataclass
class RMTCrossEntropyConfig(FairseqDataclass):
    checkpoint_segments: bool = field(
        default=False,
        metadata={"help": "recompute each segment's activations in backward, so a K-segment unroll keeps only "
                  "the memory states (non-reentrant torch checkpoint; same gradients)"},
    )
    on_nonfinite: ChoiceEnum(["stop", "skip"]) = field(
        default="stop",
        metadata={"help": "a non-finite loss or memory state in a batch: stop (error naming the update and "
                  "segment; checkpoints untouched) or skip (the batch gives zero gradient, the streams' memory "
                  "goes back to its value before the batch, a warning names update and segment)"},
    )


@register_criterion("rmt_cross_entropy", dataclass=RMTCrossEntropyConfig)
class RMTCrossEntropyCriterion(FairseqCriterion):
    handles_recurrent_state = True  # rmt_lm's build_criterion refuses criteria without this

    def __init__(self, task, checkpoint_segments=False, on_nonfinite="stop"):
        super().__init__(task)
        self.checkpoint_segments = checkpoint_segments
        self.on_nonfinite = str(on_nonfinite)
        self.char_level = getattr(task, "char_level", False)

    def forward(self, model, sample, reduce=True):
        """Returns (summed loss in nats, sample_size = scored tokens, logging output).

        `model` is whatever fairseq (or rmt-deepspeed-train) hands the criterion: the bare model, DDP's
        ModuleProxyWrapper, a fully-sharded model or a DeepSpeed engine. It is only ever called, so the wrapper
        sees the step. The streams' state goes in as sample["rmt_state"] and the state the forward returns is
        put back there for the task to keep (a wrapper may hand the forward a copy)."""
        state = sample.get("rmt_state")
        if state is None:  # called outside the task's train/valid step (e.g. by a custom loop): fresh memory
            state = RecurrentState()
        src = sample["net_input"]["src_tokens"]
        before = state.snapshot()
        loop = {}
        if getattr(self.task, "stream_level", False):  # --task rmt_lm / rmt_algorithmic: the task's truncation
            loop = dict(bptt_unroll=self.task.bptt_unroll, bptt_mode=self.task.bptt_mode)
        losses, extra = model(**sample["net_input"], target=sample["target"], rmt_state=state,
                              checkpoint_segments=self.checkpoint_segments, **loop)  # S, per scored segment
        sample["rmt_state"] = extra["rmt_state"]
        ntokens = extra["ntokens"]
        loss_ok, ok = torch.isfinite(losses), extra["memory_ok"]
        if not bool(loss_ok.all() & ok.all()):  # the one host sync per batch
            return self._nonfinite(model, sample, before, loss_ok, ok)
        loss = losses.sum()
        logging_output = {
            "loss": loss.data,
            "ntokens": ntokens,
            "nsentences": src.size(0),
            "sample_size": ntokens,
            "char_level": int(self.char_level),
            # the key a skipped batch sets, on every batch: ranks that sum logging outputs send the same keys
            "nonfinite_skipped": 0,
        }
        return loss, ntokens, logging_output

    def _nonfinite(self, model, sample, before, loss_ok, memory_ok):
        """Name the first bad segment; stop, or skip the batch with its memory update undone."""
        bad_loss = (~loss_ok).nonzero().flatten().tolist()
        bad_mem = (~memory_ok).nonzero().flatten().tolist()
        s = min(bad_loss[:1] + bad_mem[:1])
        what = "loss" if s in bad_loss else "memory state"
        where = f"update {sample['rmt_update']}" if "rmt_update" in sample else "validation"
        msg = (f"non-finite {what} at {where}, segment {s + 1} of {loss_ok.numel()} in the batch "
               f"(segment {before.segments_seen + s + 1} of the streams)")
        if self.on_nonfinite == "stop":
            raise RMTRunError(f"{msg}; stopped, checkpoints untouched. Lower --lr or --clip-norm, check the data, "
                              f"or pass --on-nonfinite skip")
        logger.warning(f"{msg}; batch skipped (--on-nonfinite skip): zero gradient, memory restored")
        sample["rmt_state"] = before
        # zero gradient for every parameter (so data-parallel all-reduces still match), none of it from the bad graph
        zero = sum(p.reshape(-1)[:1].sum() for p in model.parameters() if p.requires_grad) * 0.0
        log = {"loss": 0.0, "ntokens": 0, "nsentences": 0, "sample_size": 0, "nonfinite_skipped": 1,
               "char_level": int(self.char_level)}
        return zero, 0, log

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        skipped = sum(log.get("nonfinite_skipped", 0) for log in logging_outputs)
        if skipped:
            metrics.log_scalar_sum("nonfinite_skipped", skipped)
        loss_sum = sum(log.get("loss", 0) for log in logging_outputs)
        ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        if ntokens == 0:
            return
        # as fairseq's cross_entropy: loss in base 2 per token, perplexity from it
        metrics.log_scalar("loss", loss_sum / ntokens / math.log(2), ntokens, round=4)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["loss"].avg))
        if any(log.get("char_level", 0) for log in logging_outputs):
            # a char-level dictionary: bits per token are bits per character
            metrics.log_scalar("bpc", loss_sum / ntokens / math.log(2), ntokens, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
