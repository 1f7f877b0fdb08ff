"""The `rmt_lm` task: segment-recurrent language modelling over parallel contiguous streams.

Legend: B streams per rank, T segment length (--tokens-per-sample), K BPTT unroll, S segments per batch.

- A split is cut into B x (data-parallel size) streams; each rank reads its own B (data/streams.py).
- Training batches hold S = K+1 consecutive segments per stream in block mode, S = 1 in sliding mode (the
  loop keeps the window itself); validation and eval-lm batches hold one segment.
- Recurrent state (memory, XL cache, sliding window) is explicit data kept here, one per split, reset by the
  first batch of every pass (epoch start, every validation, every eval-lm run), and the training state is
  saved in checkpoints with the data position (fairseq's iterator state) so a resumed run continues.
- No shuffling: segments must arrive in stream order.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from fairseq import utils
from fairseq.data import Dictionary, FairseqDataset, data_utils, iterators
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.distributed import utils as dist_utils
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II

from rmt_fairseq import checkpoints
from rmt_fairseq.data.streams import StreamDataset, flatten_indexed_dataset
from rmt_fairseq.errors import RMTConfigError, check, install_excepthook
from rmt_fairseq.modules.recurrence import BPTT_MODES, RecurrentState

logger = logging.getLogger(__name__)
install_excepthook()
checkpoints.install()  # checkpoint files complete or absent; unreadable ones named (rmt_fairseq/checkpoints.py)


@dataclass
class RMTLMConfig(FairseqDataclass):
    data: str = field(default="???", metadata={"help": "path to the fairseq-preprocess'ed data directory"})
    tokens_per_sample: Optional[int] = field(
        default=None,
        metadata={"help": "segment length T (default: the architecture's: rmt_wt103 150, rmt_enwik8 512, "
                  "rmt_tiny 32; otherwise 128)"},
    )
    bptt_unroll: int = field(
        default=1,
        metadata={"help": "K: gradient flows through memory across K segments (0 = every segment detached, "
                  "so write memory gets no gradient)"},
    )
    bptt_mode: ChoiceEnum(BPTT_MODES) = field(
        default="block",
        metadata={"help": "block: each update runs K+1 new segments, loss on all, memory detached between "
                  "blocks; sliding: each update adds one segment and recomputes the K before it (LM-RMT)"},
    )
    restore_fallback: bool = field(
        default=False,
        metadata={"help": "if the checkpoint to resume from is truncated or corrupt, load the newest readable "
                  "checkpoint*.pt in the same directory instead (a warning names both files)"},
    )
    batch_size: Optional[int] = II("dataset.batch_size")
    batch_size_valid: Optional[int] = II("dataset.batch_size_valid")
    train_subset: str = II("dataset.train_subset")
    # filled in automatically when distributed
    data_parallel_rank: Optional[int] = None
    data_parallel_size: Optional[int] = None


DEFAULT_TOKENS_PER_SAMPLE = 128


@register_task("rmt_lm", dataclass=RMTLMConfig)
class RMTLMTask(FairseqTask):
    allow_full_bptt = False  # streams are endless: gradient must be truncated
    def __init__(self, cfg: RMTLMConfig, dictionary: Dictionary):
        super().__init__(cfg)
        self.dictionary = dictionary
        checkpoints.set_fallback(getattr(cfg, "restore_fallback", False))
        check((cfg.bptt_unroll is None and self.allow_full_bptt) or (cfg.bptt_unroll or 0) >= 0,
              f"--bptt-unroll must be >= 0, got {cfg.bptt_unroll}")
        check(str(cfg.bptt_mode) in BPTT_MODES, f"--bptt-mode must be one of {BPTT_MODES}, got {cfg.bptt_mode}")
        if cfg.tokens_per_sample is not None:
            check(cfg.tokens_per_sample >= 1, f"--tokens-per-sample must be >= 1, got {cfg.tokens_per_sample}")
        if cfg.batch_size is not None:
            check(cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}")
        self.states = {}  # split -> RecurrentState
        self.char_level = all(len(dictionary[i]) == 1 for i in range(dictionary.nspecial, len(dictionary)))

    @classmethod
    def setup_task(cls, cfg: RMTLMConfig, **kwargs):
        paths = utils.split_paths(cfg.data) if cfg.data not in (None, "???") else []
        check(len(paths) > 0, "no data directory given (the first positional argument, DATA)")
        check(os.path.isdir(paths[0]), f"data directory {paths[0]!r} does not exist")
        dict_path = os.path.join(paths[0], "dict.txt")
        check(os.path.isfile(dict_path), f"{dict_path} not found: is {paths[0]!r} a fairseq-preprocess output?")
        dictionary = Dictionary.load(dict_path)
        logger.info("dictionary: %d types", len(dictionary))
        return cls(cfg, dictionary)

    # ---- configuration shared with model and criterion -----------------------------------------------------

    @property
    def seg_len(self) -> int:
        return self.cfg.tokens_per_sample or DEFAULT_TOKENS_PER_SAMPLE

    @property
    def bptt_unroll(self) -> int:
        return self.cfg.bptt_unroll

    @property
    def bptt_mode(self) -> str:
        return str(self.cfg.bptt_mode)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        if self.cfg.tokens_per_sample is None and getattr(cfg, "tokens_per_sample", None):
            self.cfg.tokens_per_sample = int(cfg.tokens_per_sample)  # eval-lm without the flag: the trained T
        decoder = getattr(model, "decoder", None)
        if self.bptt_mode == "sliding" and (self.bptt_unroll or 0) > 0:
            check(decoder is not None and getattr(decoder, "recurrent", False),
                  f"--bptt-mode sliding needs recurrent memory (--mem-tokens > 0 with --memory-layout rmt), got "
                  f"--mem-tokens {getattr(cfg, 'mem_tokens', 0)}")
        if getattr(decoder, "recurrent", False) and self.bptt_unroll == 0:
            logger.warning("--bptt-unroll 0 with memory tokens: write memory receives no gradient; use >= 1")
        return model

    def build_criterion(self, cfg, from_checkpoint=False):
        criterion = super().build_criterion(cfg, from_checkpoint)
        if not getattr(criterion, "handles_recurrent_state", False):
            raise RMTConfigError(
                f"--task rmt_lm needs --criterion rmt_cross_entropy (got --criterion {cfg._name}): it carries "
                f"memory across segments and truncates BPTT; other criteria would train without memory"
            )
        return criterion

    # ---- data ----------------------------------------------------------------------------------------------

    def _parallel(self):
        if self.cfg.data_parallel_rank is None or self.cfg.data_parallel_size is None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                self.cfg.data_parallel_rank = dist_utils.get_data_parallel_rank()
                self.cfg.data_parallel_size = dist_utils.get_data_parallel_world_size()
            else:
                self.cfg.data_parallel_rank, self.cfg.data_parallel_size = 0, 1
        return self.cfg.data_parallel_rank, self.cfg.data_parallel_size

    def segments_per_batch(self, split: str) -> int:
        if split == self.cfg.train_subset and self.bptt_mode == "block":
            return self.bptt_unroll + 1
        return 1

    def load_dataset(self, split, epoch=1, combine=False, streams=None, **kwargs):
        paths = utils.split_paths(self.cfg.data)
        split_path = os.path.join(paths[(epoch - 1) % len(paths)], split)
        data = data_utils.load_indexed_dataset(split_path, self.dictionary, combine=combine)
        check(data is not None, f"split '{split}' not found: no {split_path}.bin/.idx (run fairseq-preprocess "
                                f"with --{split}pref, or pass --valid-subset / --gen-subset)")
        is_train = split == self.cfg.train_subset
        B = streams or (self.cfg.batch_size if is_train else (self.cfg.batch_size_valid or self.cfg.batch_size))
        check(B is not None, "--task rmt_lm needs --batch-size (the number of parallel streams per rank)")
        rank, size = self._parallel()
        self.datasets[split] = StreamDataset(
            flatten_indexed_dataset(data), streams_per_shard=B, seg_len=self.seg_len,
            segments_per_batch=self.segments_per_batch(split), split=split, shard_id=rank, num_shards=size, owner=data,
        )
        logger.info("%s: %d streams x %d tokens, %d batches of %d segments of %d", split, B,
                    self.datasets[split].stream_len, len(self.datasets[split]), self.segments_per_batch(split),
                    self.seg_len)

    def get_batch_iterator(self, dataset, num_workers=0, epoch=1, data_buffer_size=0,
                           skip_remainder_batch=False, **kwargs):
        # every item of a StreamDataset is a whole batch; order is the stream order (no shuffling)
        return iterators.EpochBatchIterator(
            dataset=dataset, collate_fn=dataset.collater, batch_sampler=[[i] for i in range(len(dataset))],
            num_workers=num_workers, epoch=epoch, buffer_size=data_buffer_size, disable_shuffling=True,
            skip_remainder_batch=False,
        )

    def eval_lm_dataloader(self, dataset, max_tokens=None, batch_size=None, max_positions=None, num_shards=1,
                           shard_id=0, num_workers=1, data_buffer_size=10, context_window=0):
        if context_window > 0:
            raise RMTConfigError(
                f"--context-window {context_window} does not apply to --task rmt_lm: memory (and --mem-len "
                f"cache) already carry context across segments"
            )
        return self.get_batch_iterator(dataset, num_workers=num_workers, data_buffer_size=data_buffer_size
                                       ).next_epoch_itr(shuffle=False)

    # ---- recurrent state -----------------------------------------------------------------------------------

    def state_for(self, sample) -> RecurrentState:
        """The split's state; reset on the first batch of a pass (batch_index 0 of any split)."""
        state = self.states.setdefault(sample["split"], RecurrentState())
        if sample["batch_index"] == 0:
            state.reset()
        return state

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        # a dummy batch (ignore_grad) must not touch the streams' state
        sample["rmt_state"] = RecurrentState() if ignore_grad else self.state_for(sample)
        sample["rmt_update"] = update_num + 1  # the update this batch belongs to (error messages)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def valid_step(self, sample, model, criterion):
        sample["rmt_state"] = self.state_for(sample)
        return super().valid_step(sample, model, criterion)

    def get_checkpoint_dict(self):
        train = self.states.get(self.cfg.train_subset)
        return {self.__class__.__name__: {"train_state": train.state_dict() if train is not None else None}}

    def set_checkpoint_dict(self, state):
        if state.get("train_state") is not None:
            st = RecurrentState()
            st.load_state_dict(state["train_state"])
            self.states[self.cfg.train_subset] = st

    # ---- generation: fairseq-interactive and the hub interface's sample() -------------------------------------

    def build_dataset_for_inference(self, src_tokens, src_lengths, **kwargs):
        """Prompts (one per line, </s> dropped so generation continues them) for SequenceGenerator; the model
        decodes across segment boundaries with incremental decoding inside a segment (models/rmt_lm.py)."""
        return PromptDataset(src_tokens, self.source_dictionary)

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        check(constraints is None, "--constraints is not supported with --task rmt_lm")
        with torch.no_grad():
            if prefix_tokens is None and sample["net_input"]["src_tokens"].nelement():
                prefix_tokens = sample["net_input"]["src_tokens"]  # the prompt is forced, then generation
            return generator.generate(models, sample, prefix_tokens=prefix_tokens,
                                      bos_token=self.source_dictionary.eos())  # </s> starts a line, as in training

    @property
    def source_dictionary(self):
        return self.dictionary

    @property
    def target_dictionary(self):
        return self.dictionary


class PromptDataset(FairseqDataset):
    def __init__(self, prompts, dictionary):
        super().__init__()
        eos = dictionary.eos()
        self.prompts = [p[:-1] if len(p) and p[-1] == eos else p for p in prompts]
        self.pad = dictionary.pad()
        self.sizes = np.array([len(p) for p in self.prompts])

    def __getitem__(self, i):
        return i

    def __len__(self):
        return len(self.prompts)

    def num_tokens(self, i):
        return int(self.sizes[i])

    def size(self, i):
        return int(self.sizes[i])

    def collater(self, items):
        toks = data_utils.collate_tokens([self.prompts[i] for i in items], self.pad, left_pad=False)
        return {"id": torch.tensor(items), "nsentences": len(items), "ntokens": int(toks.ne(self.pad).sum()),
                "net_input": {"src_tokens": toks, "src_lengths": torch.tensor([len(self.prompts[i]) for i in items])}}
