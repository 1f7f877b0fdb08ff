"""`rmt_long_classification`: one label per document of any length, read segment by segment by an RMT encoder
(--arch rmt_encoder_*), memory carried from segment to segment, the class predicted from the last segment.

Data directory (data/documents.py has the formats):
  dict.txt                      fairseq dictionary (a RoBERTa checkpoint's own, with --roberta-path)
  labels.txt                    optional: class labels in index order (default: the sorted train labels)
  {split}.tsv or {split}/<label>/*.txt     raw-text documents, or
  generator.json                memorization documents generated on the fly (rmt-data memorization)

--tokens-per-sample is the segment length T (logged at task setup: "segment length 16 (16-token documents in
1 segment)"); rmt-extrapolate-classify takes it from the checkpoint's config. --num-segments is the
curriculum's stage: the length of generated documents in segments, or the number of leading segments kept
from raw-text documents (default: all). --segment-curriculum grows it by one each time validation accuracy
reaches --curriculum-threshold (shared with rmt_algorithmic: tasks/curriculum.py).
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from fairseq import metrics
from fairseq.data import Dictionary
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II

from rmt_fairseq.data.documents import (
    GeneratedDocumentDataset,
    TextDocumentDataset,
    generator_noise,
    read_documents,
    read_generator,
    read_labels,
)
from rmt_fairseq.data.memorization import LOCATIONS, min_length
from rmt_fairseq.errors import RMTConfigError, check
from rmt_fairseq.modules.recurrence import DEFAULT_SEGMENT_LEN
from rmt_fairseq.tasks.curriculum import CurriculumConfig, SegmentCurriculum
from rmt_fairseq.tasks.rmt_lm import bptt_summary, check_memory_can_learn, check_no_max_tokens, training_summary

logger = logging.getLogger(__name__)


@dataclass
class RMTLongClassificationConfig(CurriculumConfig):
    data: str = field(default="???", metadata={"help": "data directory: dict.txt and documents (see the task doc)"})
    tokens_per_sample: int = field(
        default=DEFAULT_SEGMENT_LEN, metadata={"help": "segment length T (RoBERTa-base: up to 512 - --mem-tokens - 2)"}
    )
    num_segments: Optional[int] = field(
        default=None,
        metadata={"help": "generated documents: their length in segments (default 1); raw-text documents: keep "
                  "the first N segments (default: all). The curriculum's starting stage"},
    )
    curriculum_mix: bool = field(
        default=False,
        metadata={"help": "generated data: each training document gets a length of 1 to the current stage's "
                  "--num-segments segments, drawn uniformly per document, instead of the stage's length only (the "
                  "BABILong authors' advice: generate on the fly with a curriculum). Validation stays at the stage's "
                  "length, so the curriculum still advances on it"},
    )
    bptt_unroll: Optional[int] = field(
        default=None,
        metadata={"help": "K: memory detached every K+1 segments from the document start (default: never, "
                  "gradient from the label reaches the first segment)"},
    )
    batch_size: Optional[int] = II("dataset.batch_size")
    max_tokens: Optional[int] = II("dataset.max_tokens")  # refused: a batch is --batch-size documents
    seed: int = II("common.seed")


@register_task("rmt_long_classification", dataclass=RMTLongClassificationConfig)
class RMTLongClassificationTask(SegmentCurriculum, FairseqTask):
    def __init__(self, cfg: RMTLongClassificationConfig, dictionary, labels, generator, train_docs=None):
        super().__init__(cfg)
        self.dictionary, self.labels, self.generator = dictionary, labels, generator
        self._train_docs = train_docs  # read once by setup_task (for the labels), handed to load_dataset
        check(cfg.tokens_per_sample >= 1, f"--tokens-per-sample must be >= 1, got {cfg.tokens_per_sample}")
        check_no_max_tokens(cfg, "rmt_long_classification", "--batch-size documents; size it with --batch-size")
        if cfg.num_segments is not None:
            check(cfg.num_segments >= 1, f"--num-segments must be >= 1, got {cfg.num_segments}")
        if cfg.bptt_unroll is not None:
            check(cfg.bptt_unroll >= 0, f"--bptt-unroll must be >= 0, got {cfg.bptt_unroll}")
        stage = cfg.num_segments if cfg.num_segments is not None else (1 if generator else None)
        check(not cfg.segment_curriculum or stage is not None,
              "--segment-curriculum on raw-text documents needs a starting --num-segments (e.g. 1)")
        self.init_curriculum(stage)
        self.noise = generator_noise(generator, cfg.data) if generator else None
        if generator:
            need = min_length(generator["task"])
            check(stage * cfg.tokens_per_sample >= need,
                  f"a {generator['task']} document needs at least {need} tokens (its facts and question), but "
                  f"--num-segments {stage} x --tokens-per-sample {cfg.tokens_per_sample} = "
                  f"{stage * cfg.tokens_per_sample}: raise one of them")
            check(not cfg.curriculum_mix or cfg.tokens_per_sample >= need,
                  f"--curriculum-mix draws documents of one segment, but a {generator['task']} document needs at "
                  f"least {need} tokens and --tokens-per-sample is {cfg.tokens_per_sample}")
        check(not cfg.curriculum_mix or generator, f"--curriculum-mix needs generated data (rmt-data memorization); "
                                                   f"{cfg.data} has raw-text documents")
        # logged when the model is built (fairseq-train: in the run's summary line)
        self.layout_text = f"segment length {cfg.tokens_per_sample} ({self._documents()})"
        if cfg.segment_curriculum:
            self.layout_text += f"; --segment-curriculum grows them to {cfg.max_num_segments} segments"
        if cfg.curriculum_mix:
            self.layout_text += "; --curriculum-mix: training documents of 1 to the stage's segments"

    def _documents(self) -> str:
        """What a document is at the current stage, in segments and tokens."""
        T, n = self.cfg.tokens_per_sample, self.num_segments
        if self.generator is not None:
            return f"{n * T}-token documents in {n} segment{'s' if n != 1 else ''}"
        if n is None:
            return "documents of any length, every segment read"
        return f"documents cut to at most {n} segment{'s' if n != 1 else ''} = {n * T} tokens"

    def stage_note(self) -> str:
        return f": {self._documents()}"

    @classmethod
    def setup_task(cls, cfg: RMTLongClassificationConfig, **kwargs):
        data = cfg.data
        check(os.path.isdir(data), f"data directory {data!r} does not exist")
        dict_path = os.path.join(data, "dict.txt")
        check(os.path.isfile(dict_path), f"{dict_path} does not exist: write one with `rmt-data classification-dict "
                                         f"{data}` (or copy the RoBERTa checkpoint's dict.txt)")
        try:
            dictionary = Dictionary.load(dict_path)
        except Exception as e:
            raise RMTConfigError(f"{dict_path} is not a fairseq dictionary ({e})") from None
        dictionary.add_symbol("<mask>")  # as fairseq's masked_lm/sentence_prediction: RoBERTa's vocabulary size
        generator, train_docs = read_generator(data), None
        if generator is not None:
            labels = LOCATIONS
        else:
            # without labels.txt the classes come from the train split: read it once, here
            has_labels = os.path.exists(os.path.join(data, "labels.txt"))
            train_docs = None if has_labels else read_documents(data, "train")
            labels = read_labels(data, train_docs)
        logger.info("dictionary: %d types; %d classes: %s", len(dictionary), len(labels), " ".join(labels[:10]))
        return cls(cfg, dictionary, labels, generator, train_docs)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def bptt_unroll(self):
        return self.cfg.bptt_unroll

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        T = self.cfg.tokens_per_sample
        if self.generator is not None:
            if split not in self.generator["sizes"]:
                raise RMTConfigError(f"{self.cfg.data}/generator.json has no {split!r} split (has "
                                     f"{sorted(self.generator['sizes'])})")
            self.datasets[split] = GeneratedDocumentDataset(self.generator, split, self.labels, self.dictionary, T,
                                                            self.num_segments, self.noise,
                                                            mix=self.cfg.curriculum_mix and split == "train")
            return
        docs = self._train_docs if split == "train" and self._train_docs is not None else \
            read_documents(self.cfg.data, split)
        if split == "train":
            self._train_docs = None  # tokenized below; the raw text is not kept
        if docs is None:
            raise RMTConfigError(f"no split {split!r} in {self.cfg.data}: expected {split}.tsv (label<TAB>text per "
                                 f"line) or {split}/<label>/*.txt")
        self.datasets[split] = TextDocumentDataset(docs, self.labels, self.dictionary, T, self.num_segments,
                                                   source=os.path.join(self.cfg.data, split))

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        check(hasattr(model.encoder, "forward_segment"), f"--task rmt_long_classification needs an rmt_encoder "
                                                         f"architecture (rmt_encoder_base, rmt_encoder_tiny), got "
                                                         f"{type(model).__name__}")
        if from_checkpoint:
            logger.info(self.layout_text)
        else:  # fairseq-train (rmt-deepspeed-train too): what trains, once, on rank 0
            check_memory_can_learn(model.encoder, self.bptt_unroll)
            logger.info("training with %s", training_summary(
                model.encoder, self.layout_text, self.cfg.batch_size, "documents",
                bptt_summary(model.encoder, self.bptt_unroll, sample="document"), fresh_per="document"))
        return model

    def build_criterion(self, cfg, from_checkpoint=False):
        criterion = super().build_criterion(cfg, from_checkpoint)
        check(type(criterion).__name__ == "RMTClassificationCriterion",
              f"--task rmt_long_classification needs --criterion rmt_classification, got {cfg._name}")
        return criterion

    def get_batch_iterator(self, dataset, max_tokens=None, max_sentences=None, **kwargs):
        check(max_sentences or self.cfg.batch_size, "--task rmt_long_classification needs --batch-size")
        kwargs.pop("disable_iterator_cache", None)
        # fairseq's default --required-batch-size-multiple 8 makes batch_by_size drop samples when the batch
        # size is not a multiple of 8 (201 samples in batches of 32 -> 200 scored, 40 in batches of 4 -> 36)
        kwargs["required_batch_size_multiple"] = 1
        return super().get_batch_iterator(dataset, max_tokens=None, max_sentences=max_sentences or self.cfg.batch_size,
                                          disable_iterator_cache=True, **kwargs)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        self.advance_curriculum()
        loss, sample_size, log = super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
        log["num_segments"] = sample["num_segments"]
        return loss, sample_size, log

    def valid_step(self, sample, model, criterion):
        loss, sample_size, log = super().valid_step(sample, model, criterion)
        self.count_valid(log.get("ncorrect", 0), log.get("nsentences", 0))
        return loss, sample_size, log

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        if any("num_segments" in log for log in logging_outputs):  # training: the curriculum stage
            metrics.log_scalar("num_segments", max(log.get("num_segments", 0) for log in logging_outputs),
                               1, priority=250, round=1)

    def max_positions(self):
        return None

    @property
    def source_dictionary(self):
        return self.dictionary

    @property
    def target_dictionary(self):
        return self.dictionary
