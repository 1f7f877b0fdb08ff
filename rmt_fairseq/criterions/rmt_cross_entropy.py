"""`rmt_cross_entropy`: cross-entropy over every segment of a batch, run through the segment loop with the
task's recurrent state and truncated BPTT (modules/recurrence.py)."""

import math
from dataclasses import dataclass, field

import torch
from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass

from rmt_fairseq.modules.recurrence import RecurrentState, run_segments


@dataclass
class RMTCrossEntropyConfig(FairseqDataclass):
    checkpoint_segments: bool = field(
        default=False,
        metadata={"help": "recompute each segment's activations in backward, so a K-segment unroll keeps only "
                  "the memory states (non-reentrant torch checkpoint; same gradients)"},
    )


@register_criterion("rmt_cross_entropy", dataclass=RMTCrossEntropyConfig)
class RMTCrossEntropyCriterion(FairseqCriterion):
    handles_recurrent_state = True  # rmt_lm's build_criterion refuses criteria without this

    def __init__(self, task, checkpoint_segments=False):
        super().__init__(task)
        self.checkpoint_segments = checkpoint_segments
        self.char_level = getattr(task, "char_level", False)

    def forward(self, model, sample, reduce=True):
        """Returns (summed loss in nats, sample_size = scored tokens, logging output)."""
        state = sample.get("rmt_state")
        if state is None:  # called outside the task's train/valid step (e.g. by a custom loop): fresh memory
            state = RecurrentState()
        src = sample["net_input"]["src_tokens"]
        if state.memory is not None and state.memory.device != src.device:
            state.to(src.device)
        out = run_segments(
            model.decoder, src, sample["target"], state,
            seg_len=sample["net_input"].get("segment_len") or self.task.seg_len,
            bptt_unroll=self.task.bptt_unroll, bptt_mode=self.task.bptt_mode,
            checkpoint_segments=self.checkpoint_segments,
        )
        loss = torch.stack(out.losses).sum()
        logging_output = {
            "loss": loss.data,
            "ntokens": out.ntokens,
            "nsentences": src.size(0),
            "sample_size": out.ntokens,
            "char_level": int(self.char_level),
        }
        return loss, out.ntokens, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        loss_sum = sum(log.get("loss", 0) for log in logging_outputs)
        ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        # as fairseq's cross_entropy: loss in base 2 per token, perplexity from it
        metrics.log_scalar("loss", loss_sum / ntokens / math.log(2), ntokens, round=4)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["loss"].avg))
        if any(log.get("char_level", 0) for log in logging_outputs):
            # a char-level dictionary: bits per token are bits per character
            metrics.log_scalar("bpc", loss_sum / ntokens / math.log(2), ntokens, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
