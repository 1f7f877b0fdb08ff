"""`rmt_algorithmic`: copy, reverse, associative retrieval and quadratic equations (RMT paper §4, App. A).

Legend: B samples, S segments per sample, T segment length.

Every sample "source <gen> target" is split into `--num-segments` equal segments (or segments of
`--tokens-per-sample`) and run through the same segment loop as rmt_lm, with memory fresh for every sample.
Loss and accuracies cover only the target.

The segment length follows from the data: T = ceil(L / S) for samples of L tokens (source, <gen>, target) in S
segments. Task setup logs it ("segment length 11 (31-token samples in 3 segments)", from the train split's
index), and a model built for training records it in its config (`trained_segment_len`, saved in every
checkpoint; updated when --segment-curriculum changes S) where every sample of the train split has the same
length, so the tools that load the checkpoint (rmt-extrapolate, rmt-plot-attention) run at the trained length.

Validation logs, besides the teacher-forced loss:
  acc_tf / em_tf   teacher-forced per-token accuracy and exact match (whole target right)
  acc / em         the same for greedy decoding across segment boundaries (no teacher forcing): the reported
                   accuracies (--no-eval-greedy skips them)
  answer_acc       with --answer-len N: the last N target tokens all right (Table 1's equation accuracy:
                   the 30-character answer slot)
"""

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
from fairseq import metrics
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, OmegaConf, open_dict

from rmt_fairseq.data.algorithmic import GEN
from rmt_fairseq.data.samples import SegmentedSampleDataset
from rmt_fairseq.errors import check
from rmt_fairseq.modules.generation import greedy_decode, model_step
from rmt_fairseq.modules.recurrence import BPTT_MODES, RecurrentState
from rmt_fairseq.tasks.curriculum import CurriculumConfig, SegmentCurriculum
from rmt_fairseq.tasks.rmt_lm import (
    RMTLMConfig,
    RMTLMTask,
    bptt_summary,
    load_split,
    training_summary,
)

logger = logging.getLogger(__name__)


def sample_lengths(data: str, split: str) -> Optional[Tuple[int, int]]:
    """(shortest, longest) input of a binarized split: the tokens a sample feeds the model (source, <gen>,
    target; not the closing </s>), read from the split's index only. None when the split is absent or empty."""
    from fairseq import utils
    from fairseq.data import indexed_dataset

    path = os.path.join(utils.split_paths(data)[0], split) if isinstance(data, str) else None
    if path is None or not os.path.isfile(path + ".bin") or os.path.getsize(path + ".bin") == 0:
        return None
    impl = indexed_dataset.infer_dataset_impl(path)
    ds = indexed_dataset.make_dataset(path, impl=impl) if impl else None
    if ds is None or len(ds) == 0:
        return None
    sizes = ds.sizes  # a view into ds's mapped index: read while ds is alive
    return int(sizes.min()) - 1, int(sizes.max()) - 1


def segment_layout(lengths: Tuple[int, int], num_segments: int, tokens_per_sample: Optional[int]):
    """(T, description) for samples of `lengths` (shortest, longest) split into `num_segments` equal segments or
    segments of `tokens_per_sample`: T is the one segment length every batch gets, None when it varies with the
    batch (samples of different lengths in --num-segments equal segments)."""
    lo, hi = lengths
    if tokens_per_sample:
        seg_lens, segs = (tokens_per_sample, tokens_per_sample), (math.ceil(lo / tokens_per_sample),
                                                                 math.ceil(hi / tokens_per_sample))
    else:  # a batch is padded to its longest sample, then cut into S equal segments
        seg_lens, segs = (math.ceil(lo / num_segments), math.ceil(hi / num_segments)), (num_segments, num_segments)

    def span(pair):
        return f"{pair[0]}" if pair[0] == pair[1] else f"{pair[0]} to {pair[1]}"

    text = (f"segment length {span(seg_lens)} ({span(lengths)}-token samples in {span(segs)} "
            f"segment{'s' if segs != (1, 1) else ''})")
    return (seg_lens[0] if seg_lens[0] == seg_lens[1] else None), text


def trained_layout(state: dict, data: str) -> dict:
    """What an rmt_algorithmic checkpoint (`state`, as checkpoint_utils.load_checkpoint_to_cpu returns it) was
    trained with: {"segment_len": T or None, "num_segments": S or None, "sample_len": L or None, "source": ...}.
    T is the recorded `trained_segment_len`; a checkpoint from before it was recorded gets T from its
    --tokens-per-sample, or from the train split of `data` (the training data-bin) split into the --num-segments
    (curriculum stage) it reached."""
    cfg = state["cfg"]
    task_cfg, model_cfg = cfg["task"], cfg["model"]
    stage = ((state.get("extra_state") or {}).get("RMTAlgorithmicTask") or {}).get("num_segments")
    S = int(stage or task_cfg.get("num_segments") or 1)
    tps = task_cfg.get("tokens_per_sample")
    split = OmegaConf.select(cfg, "dataset.train_subset", default=None) or "train"
    lengths = sample_lengths(data, split)
    T_data = segment_layout(lengths, S, tps)[0] if lengths else None
    recorded = model_cfg.get("trained_segment_len") if model_cfg is not None else None
    if recorded:
        T, source = int(recorded), "recorded in the checkpoint"
    elif tps:
        T, source = int(tps), "the checkpoint's --tokens-per-sample"
    else:
        T, source = T_data, f"its --num-segments {S} over the {split} split of {data}"
    single = lengths[1] if lengths and lengths[0] == lengths[1] else None
    return {"segment_len": T, "num_segments": math.ceil(single / T) if single and T else (None if tps else S),
            "sample_len": single, "source": source}


@dataclass
class RMTAlgorithmicConfig(RMTLMConfig, CurriculumConfig):
    num_segments: int = field(default=1, metadata={"help": "split every sample into S equal segments"})
    tokens_per_sample: Optional[int] = field(
        default=None, metadata={"help": "segment length T instead of --num-segments (S = ceil(length / T))"}
    )
    bptt_unroll: Optional[int] = field(
        default=None, metadata={"help": "K: memory detached every K+1 segments (default: never, full BPTT)"}
    )
    bptt_mode: ChoiceEnum(BPTT_MODES) = field(default="block", metadata={"help": "see --task rmt_lm"})
    no_eval_greedy: bool = field(
        default=False, metadata={"help": "skip greedy decoding in validation (acc, em): teacher-forced metrics only"}
    )
    answer_len: int = field(
        default=0, metadata={"help": "log answer_acc: the last N target tokens all right (30 for equations)"}
    )
    seed: int = II("common.seed")


@register_task("rmt_algorithmic", dataclass=RMTAlgorithmicConfig)
class RMTAlgorithmicTask(SegmentCurriculum, RMTLMTask):
    allow_full_bptt = True
    resumes_streams = False  # independent samples: no stream position or memory to continue

    def __init__(self, cfg: RMTAlgorithmicConfig, dictionary):
        super().__init__(cfg, dictionary)
        check(cfg.num_segments >= 1, f"--num-segments must be >= 1, got {cfg.num_segments}")
        check(cfg.answer_len >= 0, f"--answer-len must be >= 0, got {cfg.answer_len}")
        if cfg.segment_curriculum:
            check(cfg.tokens_per_sample is None, "--segment-curriculum grows --num-segments: drop --tokens-per-sample")
        self.init_curriculum(cfg.num_segments)
        self.gen_idx = dictionary.index(GEN)
        check(self.gen_idx != dictionary.unk(), f"the dictionary of {cfg.data!r} has no {GEN} token: generate the "
                                                f"data with rmt-data")
        self._model_cfg = None  # the config of the model built for training: where the segment length is recorded
        self.train_lengths = sample_lengths(cfg.data, self._train_split)
        self.layout_text = None  # logged when the model is built (fairseq-train: in the run's summary line)
        if self.train_lengths:
            self.layout_text = self._layout_of(self.train_lengths)[1]
            if cfg.segment_curriculum:
                last = segment_layout(self.train_lengths, cfg.max_num_segments, None)[1].split(" (")[0]
                self.layout_text += f"; --segment-curriculum grows it to {cfg.max_num_segments} segments ({last})"

    @property
    def _train_split(self) -> str:
        return self.cfg.train_subset or "train"  # RMTLMConfig links it to --train-subset

    def _layout_of(self, lengths):
        return segment_layout(lengths, self.num_segments, self.cfg.tokens_per_sample)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)  # training: logs run_summary
        if from_checkpoint and self.layout_text:
            logger.info(self.layout_text)
        if not from_checkpoint and OmegaConf.is_config(cfg):
            self._model_cfg = cfg  # fairseq saves this config in every checkpoint (as rmt_fairseq.compat does)
            self._record_segment_len()
        return model

    def run_summary(self, model) -> str:
        """As --task rmt_lm's, for independent samples: each starts with fresh memory."""
        layout = self.layout_text or f"{self.num_segments} segments per sample"
        return training_summary(model.decoder, layout, self.cfg.batch_size, "samples",
                                bptt_summary(model.decoder, self.bptt_unroll, self.bptt_mode), fresh_per="sample")

    def _record_segment_len(self) -> None:
        """The segment length the model trains with at the current stage, into the config its checkpoints keep
        (None where it varies from batch to batch: samples of different lengths in equal segments)."""
        if self._model_cfg is None or not self.train_lengths:
            return
        with open_dict(self._model_cfg):
            self._model_cfg.trained_segment_len = self._layout_of(self.train_lengths)[0]

    def set_num_segments(self, n: int) -> None:
        super().set_num_segments(n)
        self._record_segment_len()

    def stage_note(self) -> str:
        return f": {self._layout_of(self.train_lengths)[1]}" if self.train_lengths else ""

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        from fairseq import utils

        split_path = os.path.join(utils.split_paths(self.cfg.data)[0], split)
        data = load_split(split_path, split, self.dictionary, combine=combine)
        self.datasets[split] = SegmentedSampleDataset(
            data, self.gen_idx, self.dictionary.pad(), self.dictionary.eos(), split,
            num_segments=self.num_segments, seg_len=self.cfg.tokens_per_sample)
        sizes = self.datasets[split].sizes
        if split != self._train_split and len(sizes):
            lengths = (int(sizes.min()) - 1, int(sizes.max()) - 1)
            if lengths != self.train_lengths:  # the train split's layout was logged at setup
                logger.info("%s: %s", split, self._layout_of(lengths)[1])

    def get_batch_iterator(self, dataset, max_tokens=None, max_sentences=None, **kwargs):
        check(max_sentences or self.cfg.batch_size, "--task rmt_algorithmic needs --batch-size")
        kwargs.pop("disable_iterator_cache", None)
        # fairseq's default --required-batch-size-multiple 8 makes batch_by_size drop samples when the batch
        # size is not a multiple of 8 (201 samples in batches of 32 -> 200 scored, 40 in batches of 4 -> 36)
        kwargs["required_batch_size_multiple"] = 1
        return FairseqTask.get_batch_iterator(self, dataset, max_tokens=max_tokens,
                                              max_sentences=max_sentences or self.cfg.batch_size,
                                              disable_iterator_cache=True, **kwargs)

    @property
    def seg_len(self):
        return None  # per batch, from net_input["segment_len"]

    # every sample starts from fresh memory
    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        self.advance_curriculum()
        self._layout(sample)
        sample["rmt_state"] = RecurrentState()
        sample["rmt_update"] = update_num + 1
        loss, sample_size, log = FairseqTask.train_step(self, sample, model, criterion, optimizer, update_num,
                                                        ignore_grad)
        log["num_segments"] = sample["num_segments"]
        return loss, sample_size, log

    def valid_step(self, sample, model, criterion):
        self._layout(sample)
        sample["rmt_state"] = RecurrentState()
        loss, sample_size, log = FairseqTask.valid_step(self, sample, model, criterion)
        with torch.no_grad():
            log.update(self.accuracy(model, sample))
        prefix = "tf" if self.cfg.no_eval_greedy else "greedy"  # the curriculum's accuracy
        self.count_valid(log[f"{prefix}_correct"], log[f"{prefix}_total"])
        return loss, sample_size, log

    def _layout(self, sample):
        if sample and sample.get("split") in self.datasets:
            self.datasets[sample["split"]].apply_layout(sample)

    @torch.no_grad()
    def accuracy(self, model, sample) -> dict:
        # through the (possibly wrapped) model's forward, as training: no path around it
        src, tgt, T = sample["net_input"]["src_tokens"], sample["target"], sample["net_input"]["segment_len"]
        scored = tgt.ne(self.dictionary.pad())  # B x S*T
        step = model_step(model, T)
        pred = step(src, RecurrentState())[0].argmax(-1)  # B x S*T, teacher forced
        out = self._counts("tf", pred, tgt, scored)
        if not self.cfg.no_eval_greedy:
            greedy = torch.empty_like(pred)
            # decode rows with the same prompt length together (all rows, for the fixed-format tasks)
            for g in sample["gen"].unique().tolist():
                rows = (sample["gen"] == g).nonzero().squeeze(1)
                last = int(scored[rows].nonzero()[:, 1].max()) if scored[rows].any() else g
                seq, _ = greedy_decode(step, src[rows], prompt_len=g + 1, end=last + 2, seg_len=T,
                                       pad=self.dictionary.pad())
                greedy[rows] = torch.nn.functional.pad(seq[:, 1:], (0, 1), value=self.dictionary.pad())
            out.update(self._counts("greedy", greedy, tgt, scored))
            if self.cfg.answer_len:
                ok = []
                for r in range(tgt.size(0)):
                    pos = scored[r].nonzero().squeeze(1)[-self.cfg.answer_len :]
                    ok.append(bool((greedy[r, pos] == tgt[r, pos]).all()))
                out["answer_correct"] = sum(ok)
        return out

    @staticmethod
    def _counts(prefix, pred, tgt, scored):
        right = (pred == tgt) & scored
        return {
            f"{prefix}_correct": int(right.sum()),
            f"{prefix}_total": int(scored.sum()),
            f"{prefix}_exact": int((right | ~scored).all(dim=1).sum()),
            "nseq": tgt.size(0),
        }

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        total = lambda k: sum(log.get(k, 0) for log in logging_outputs)  # noqa: E731
        n = total("nseq")
        for prefix, acc, em in [("tf", "acc_tf", "em_tf"), ("greedy", "acc", "em")]:
            if total(f"{prefix}_total"):
                metrics.log_scalar(acc, 100.0 * total(f"{prefix}_correct") / total(f"{prefix}_total"),
                                   total(f"{prefix}_total"), round=2)
                metrics.log_scalar(em, 100.0 * total(f"{prefix}_exact") / n, n, round=2)
        if any("num_segments" in log for log in logging_outputs):  # training: the curriculum stage
            metrics.log_scalar("num_segments", max(log.get("num_segments", 0) for log in logging_outputs),
                               1, priority=250, round=1)
        if not any("tf_total" in log for log in logging_outputs):
            return
        if any("answer_correct" in log for log in logging_outputs):
            metrics.log_scalar("answer_acc", 100.0 * total("answer_correct") / n, n, round=2)

    def eval_lm_dataloader(self, *args, **kwargs):
        check(False, "fairseq-eval-lm does not apply to --task rmt_algorithmic: use fairseq-validate "
                     "(--valid-subset test) to score a checkpoint")
