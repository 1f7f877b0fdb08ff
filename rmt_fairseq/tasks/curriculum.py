"""Curriculum over segments (Bulatov et al. 2023, §4.1: train on 1 segment, then 2, ... up to N), shared by
--task rmt_algorithmic and --task rmt_long_classification.

A task mixes in `SegmentCurriculum`, counts correct / total predictions in its validation steps with
`count_valid`, and its datasets expose a `num_segments` attribute (what one stage means is the dataset's:
segments per sample, generated document length, or the crop of a real document). After every validation
pass whose accuracy reaches --curriculum-threshold, the next training step moves to one more segment. The
stage is saved in the checkpoint, so a resumed run continues at the stage it reached.
"""

import logging
from dataclasses import dataclass, field

from fairseq.dataclass import FairseqDataclass

from rmt_fairseq.errors import check

logger = logging.getLogger(__name__)


@dataclass
class CurriculumConfig(FairseqDataclass):
    segment_curriculum: bool = field(
        default=False,
        metadata={"help": "grow --num-segments by one each time validation accuracy reaches "
                  "--curriculum-threshold, up to --max-num-segments (Bulatov et al. 2023, §4.1). (fairseq's own "
                  "--curriculum N is unrelated: it disables shuffling for N epochs)"},
    )
    curriculum_threshold: float = field(
        default=95.0, metadata={"help": "validation accuracy (%) that moves the curriculum to the next stage"}
    )
    max_num_segments: int = field(default=8, metadata={"help": "the curriculum's last stage"})


class SegmentCurriculum:
    """Mixin: `self.cfg` carries CurriculumConfig's fields, `self.datasets` the datasets to re-segment."""

    def init_curriculum(self, num_segments: int) -> None:
        cfg = self.cfg
        if cfg.segment_curriculum:
            check(num_segments is not None and cfg.max_num_segments >= num_segments,
                  f"--max-num-segments {cfg.max_num_segments} is below --num-segments {num_segments}")
        self.num_segments = num_segments  # the current stage
        self._valid_counts = None  # accuracy of the last validation pass, decided on at the next train step

    def begin_valid_epoch(self, epoch, model):
        self._valid_counts = {"correct": 0, "total": 0}

    def count_valid(self, correct: int, total: int) -> None:
        if self._valid_counts is not None:
            self._valid_counts["correct"] += correct
            self._valid_counts["total"] += total

    def advance_curriculum(self) -> None:
        """At a train step after a validation pass: one more segment if its accuracy reached the threshold."""
        counts, self._valid_counts = self._valid_counts, None
        if not self.cfg.segment_curriculum or not counts or not counts["total"]:
            return
        acc = 100.0 * counts["correct"] / counts["total"]
        if acc >= self.cfg.curriculum_threshold and self.num_segments < self.cfg.max_num_segments:
            self.set_num_segments(self.num_segments + 1)
            logger.info("curriculum: validation accuracy %.2f >= %.2f, now %d segments per sample%s", acc,
                        self.cfg.curriculum_threshold, self.num_segments, self.stage_note())

    def stage_note(self) -> str:
        """What the new stage means, appended to the curriculum's log line (rmt_algorithmic: the segment
        length, which shrinks as the same samples are cut into more segments)."""
        return ""

    def set_num_segments(self, n: int) -> None:
        # datasets collate lazily, so the next batch is made the new way (with --num-workers > 0, from the
        # next epoch, when the workers get a fresh copy of the dataset)
        self.num_segments = n
        for ds in self.datasets.values():
            ds.num_segments = n

    def get_checkpoint_dict(self):
        return {self.__class__.__name__: {"num_segments": self.num_segments}}

    def set_checkpoint_dict(self, state):
        if state.get("num_segments") is not None:
            self.set_num_segments(int(state["num_segments"]))
