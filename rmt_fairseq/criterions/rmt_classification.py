"""`rmt_classification`: one label per document, cross-entropy on the document's last segment, every segment
run through the segment loop (modules/recurrence.py) with fresh memory per document and the task's BPTT
truncation. Logs loss (base 2, per document) and accuracy."""

import math
from dataclasses import dataclass, field

from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass


@dataclass
class RMTClassificationConfig(FairseqDataclass):
    checkpoint_segments: bool = field(
        default=False,
        metadata={"help": "recompute each segment's activations in backward, so a document of S segments keeps "
                  "only the memory states (non-reentrant torch checkpoint; same gradients; no training accuracy)"},
    )


@register_criterion("rmt_classification", dataclass=RMTClassificationConfig)
class RMTClassificationCriterion(FairseqCriterion):
    def __init__(self, task, checkpoint_segments=False):
        super().__init__(task)
        self.checkpoint_segments = checkpoint_segments

    def forward(self, model, sample, reduce=True):
        """Returns (summed loss in nats, sample_size = documents, logging output). The (possibly wrapped) model
        is called, never reached around, so data-parallel wrappers see the step."""
        losses, extra = model(**sample["net_input"], target=sample["target"], bptt_unroll=self.task.bptt_unroll,
                              checkpoint_segments=self.checkpoint_segments)
        loss = losses.sum()
        n, preds = extra["ndocs"], extra["preds"]
        log = {"loss": loss.data, "ntokens": sample["ntokens"], "nsentences": n, "sample_size": n}
        if bool((preds >= 0).all()):
            log["ncorrect"] = int((preds == sample["labels"]).sum())
        return loss, n, log

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        loss = sum(log.get("loss", 0) for log in logging_outputs)
        n = sum(log.get("nsentences", 0) for log in logging_outputs)
        if n == 0:
            return
        metrics.log_scalar("loss", loss / n / math.log(2), n, round=4)  # as fairseq's sentence_prediction
        if all("ncorrect" in log for log in logging_outputs):
            metrics.log_scalar("accuracy", 100.0 * sum(log["ncorrect"] for log in logging_outputs) / n, n, round=2)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
