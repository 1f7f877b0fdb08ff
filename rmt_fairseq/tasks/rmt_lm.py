"""The `rmt_lm` task: segment-recurrent language modelling over parallel contiguous streams.

Legend: B streams per rank, T segment length (--tokens-per-sample), K BPTT unroll, S segments per batch.

- A split is cut into B x (data-parallel size) streams; each rank reads its own B (data/streams.py).
- Training batches hold S = K+1 consecutive segments per stream in block mode, S = 1 in sliding mode (the
  loop keeps the window itself); validation and eval-lm batches hold --eval-segments-per-batch (default 1).
- Recurrent state (memory, XL cache, sliding window) is explicit data kept here, one per split, reset by the
  first batch of every pass (epoch start, every validation, every eval-lm run), and the training state is
  saved in checkpoints with the data position (fairseq's iterator state) so a resumed run continues.
- No shuffling: segments must arrive in stream order.
- Checkpoints are checked before fairseq loads them (check_checkpoint): fairseq-train turns every load failure
  into "please ensure that the architectures match" with a traceback, and resumes a mid-epoch position with
  whatever memory it finds. The checks name the file and what differs.
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

from rmt_fairseq import checkpoints, compat, distributed, quiet
from rmt_fairseq.data.streams import StreamDataset, flatten_indexed_dataset
from rmt_fairseq.errors import RMTConfigError, check, install_excepthook
from rmt_fairseq.models.config import ARMT_MEMORY_RESET_INTERVAL
from rmt_fairseq.modules.generation import unknown_prompt_message
from rmt_fairseq.modules.recurrence import (
    BPTT_MODES,
    DEFAULT_SEGMENT_LEN,
    RecurrentState,
    concat_states,
    num_streams,
    slice_state,
)

logger = logging.getLogger(__name__)
install_excepthook()
checkpoints.install()  # checkpoint files complete or absent; unreadable ones named (rmt_fairseq/checkpoints.py)
compat.install()  # fairseq-eval-lm / numpy 2 fixes for fairseq's own tools (rmt_fairseq/compat.py)
distributed.install()  # several ranks on CPU, every rank's streams in the checkpoint (rmt_fairseq/distributed.py)
quiet.restore_fairseq_logging()  # fairseq's log format in eval-lm, validate, interactive (rmt_fairseq/quiet.py)


@dataclass
class RMTLMConfig(FairseqDataclass):
    data: str = field(default="???", metadata={"help": "path to the fairseq-preprocess'ed data directory"})
    tokens_per_sample: Optional[int] = field(
        default=None,
        metadata={"help": "segment length T (default: the --arch preset's, which --help with --arch shows; a "
                  f"loaded checkpoint's trained one; otherwise {DEFAULT_SEGMENT_LEN})"},
    )
    bptt_unroll: int = field(
        default=1,
        metadata={"help": "K: gradient flows through memory across K segments (0 = every segment detached, "
                  "so write memory gets no gradient)"},
    )
    memory_reset_interval: Optional[int] = field(
        default=None,
        metadata={"help": "start every stream's memory (and cache) afresh once every N segments, in training and "
                  "in evaluation alike: recorded in the checkpoint, so validation, fairseq-eval-lm and the hub "
                  "restart where training did (given to a tool, it overrides what the model was trained with; 0: "
                  "never, e.g. to carry memory across a whole split). Without it a training stream's memory is "
                  "reset only at the start of an epoch. Default: never, except for ARMT models "
                  f"(--associative-memory): every {ARMT_MEMORY_RESET_INTERVAL} segments (issue 29)"},
    )
    eval_segments_per_batch: int = field(
        default=1,
        metadata={"help": "validation and eval-lm batches hold this many consecutive segments of every stream (the "
                  "same segments and scores as one at a time; several let --inference-schedule diagonal batch the "
                  "layers of different segments)"},
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
    # fairseq's transformer_lm config links these to the task (--arch rmt_transformer_lm* under --task rmt_lm)
    max_target_positions: Optional[int] = field(
        default=None, metadata={"help": "rmt_transformer_lm*: size of its absolute position table (default: "
                                "--tokens-per-sample, the segment)"}
    )
    add_bos_token: bool = field(
        default=False, metadata={"help": "as fairseq's language_modeling flag; --task rmt_lm streams do not prepend "
                                 "<s>, so it must stay off"}
    )
    batch_size: Optional[int] = II("dataset.batch_size")
    batch_size_valid: Optional[int] = II("dataset.batch_size_valid")
    max_tokens: Optional[int] = II("dataset.max_tokens")  # refused: a batch is streams x segment tokens
    train_subset: str = II("dataset.train_subset")
    # filled in automatically when distributed
    data_parallel_rank: Optional[int] = None
    data_parallel_size: Optional[int] = None
    # the checkpoints fairseq-train resumes from and fairseq-eval-lm/-interactive load (check_checkpoint)
    restore_file: Optional[str] = II("checkpoint.restore_file")
    save_dir: Optional[str] = II("checkpoint.save_dir")
    finetune_from_model: Optional[str] = II("checkpoint.finetune_from_model")
    reset_dataloader: Optional[bool] = II("checkpoint.reset_dataloader")
    checkpoint_suffix: Optional[str] = II("checkpoint.checkpoint_suffix")
    path: Optional[str] = II("common_eval.path")


# model fields that shape parameters: listed by name when a checkpoint does not fit the model of the flags
STRUCTURAL_FIELDS = ["decoder_layers", "decoder_embed_dim", "decoder_ffn_embed_dim", "decoder_attention_heads",
                     "decoder_head_dim", "mem_tokens", "share_decoder_input_output_embed", "adaptive_input",
                     "adaptive_input_cutoff", "adaptive_input_factor", "adaptive_softmax_cutoff",
                     "adaptive_softmax_factor", "tie_adaptive_weights", "tie_adaptive_proj", "embedding_impl",
                     "div_val", "associative_memory", "d_mem", "dpfp_nu", "memory_layout", "memory_gate_input"]


def _linked(cfg, key):
    """A linked (II) config value, or None where the link is unset or cannot resolve (a task config built
    on its own, as in unit tests, or a checkpoint's config from before the field existed)."""
    try:
        value = getattr(cfg, key, None)
    except Exception:
        return None
    return None if isinstance(value, str) and value.startswith("${") else value


def _saved(state, group: str, key: str):
    """A value of the config saved in a checkpoint (`cfg`, or the legacy argparse `args`)."""
    cfg = state.get("cfg")
    if cfg is not None:
        sub = cfg.get(group)
        return sub.get(key) if sub is not None else None
    args = state.get("args")
    if key == "_name":
        key = {"model": "arch", "task": "task"}[group]
    return getattr(args, key, None)


def _bad_dictionary_line(path: str) -> Optional[str]:
    """The first line of a dict.txt that is not `<token> <count> [#fairseq:overwrite]`, for the error."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            fields = line.rstrip("\n").replace(" #fairseq:overwrite", "").rsplit(" ", 1)
            if len(fields) != 2 or not fields[1].strip().isdigit():
                return f"line {n} {line.rstrip()!r} is not '<token> <count>'"
    return None


def carries_memory(decoder) -> bool:
    """Whether a model hands learned state from segment to segment: RMT's memory tokens or ARMT's associative
    memory (the XL cache is detached and not counted)."""
    return bool(getattr(decoder, "recurrent", False) or getattr(decoder, "associative", False))


def check_memory_can_learn(module, bptt_unroll: Optional[int]) -> None:
    """Refuse a training run whose memory can never move: ARMT's write projection W_V starts at zero and reaches a
    loss only through a later segment's read, so at --bptt-unroll 0 it gets no gradient and the associative memory
    stores nothing, ever (issue 29). `module`: the model's decoder or encoder."""
    check(not (getattr(module, "associative", False) and bptt_unroll == 0),
          "--bptt-unroll 0 with --associative-memory: ARMT's write (W_V, zero at the start) reaches a loss only "
          "through the next segment, so at K = 0 it gets no gradient and the memory never stores anything; use "
          "--bptt-unroll >= 1")


def memory_summary(module, fresh_per: Optional[str] = None) -> str:
    """What a model (its decoder or encoder) carries from segment to segment, with the flags that set it;
    `fresh_per` ("sample"): the task starts it afresh for every sample."""
    L = getattr(module, "mem_len", 0) or 0
    kinds = [k for k in [module.scheme.describe(module)] if k is not None]  # the memory scheme's own words
    if L:
        kinds.append(f"Transformer-XL cache of {L} tokens (--mem-len), detached")
    if not kinds:
        return f"none (--mem-tokens 0{', --mem-len 0' if hasattr(module, 'mem_len') else ''})"
    return " + ".join(kinds) + (f", fresh per {fresh_per}" if fresh_per else "")


def bptt_summary(module, bptt_unroll: Optional[int], bptt_mode: str = "block", per_update: Optional[int] = None,
                 sample: str = "sample") -> str:
    """How far back the gradient of a segment's loss reaches through memory (modules/recurrence.py's truncation)."""
    if not carries_memory(module):
        return "no BPTT (nothing learned is carried from segment to segment)"
    if bptt_unroll is None:
        return f"BPTT through every segment boundary of a {sample} (--bptt-unroll not set)"
    K = bptt_unroll
    text = f"BPTT through {K} segment boundar{'y' if K == 1 else 'ies'} (--bptt-unroll {K}"
    if str(bptt_mode) == "sliding":
        return text + f", --bptt-mode sliding: each update adds one segment and recomputes the {K} before it)"
    if per_update is None:
        return text + ")"
    return text + f": {per_update} segment{'s' if per_update != 1 else ''} per update)"


def data_parallel_size() -> int:
    """The number of data-parallel ranks of this run (1 before or without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return dist_utils.get_data_parallel_world_size()
    return 1


def per_rank(n: int, unit: str, ranks: int) -> str:
    """`n` units per rank (--batch-size), and in all across the ranks."""
    return f"{n} {unit} per rank (--batch-size) x {ranks} ranks = {n * ranks} {unit}" if ranks > 1 else \
        f"{n} {unit} (--batch-size)"


def training_summary(module, layout: str, batch_size: int, unit: str, bptt: str,
                     fresh_per: Optional[str] = None) -> str:
    """fairseq-train's one line on what trains, for every task of the plugin: memory kind, segment layout,
    `batch_size` `unit`s per rank (and in all), and the BPTT text (bptt_summary)."""
    return "; ".join([f"memory: {memory_summary(module, fresh_per)}", layout,
                      per_rank(batch_size, unit, data_parallel_size()), bptt])


def check_no_max_tokens(cfg, task: str, batch: str) -> None:
    """fairseq's --max-tokens, which a task that batches whole streams or documents would ignore: one error line
    (`batch`: what a batch of `task` is, and which flags size it)."""
    value = _linked(cfg, "max_tokens")
    check(value is None, f"--max-tokens {value}: not used by --task {task}, whose batch is {batch}")


def segments_per_batch(bptt_mode, bptt_unroll) -> int:
    """Segments per training batch: block mode runs the K+1 segments of an unroll together, sliding one."""
    return (bptt_unroll or 0) + 1 if str(bptt_mode) == "block" else 1


def load_split(split_path: str, split: str, dictionary, combine: bool = False):
    """The indexed dataset of one split, or a one-line error for a split that is missing or empty."""
    bin_path = split_path + ".bin"
    check(not (os.path.isfile(bin_path) and os.path.getsize(bin_path) == 0),
          f"split '{split}' is empty ({bin_path} has 0 bytes: fairseq-preprocess was given an empty file); "
          f"binarize a non-empty --{split}pref, or choose another split with --train-subset / --valid-subset / "
          f"--gen-subset")
    data = data_utils.load_indexed_dataset(split_path, dictionary, combine=combine)
    check(data is not None, f"split '{split}' not found: no {split_path}.bin/.idx (run fairseq-preprocess "
                            f"with --{split}pref, or pass --valid-subset / --gen-subset)")
    return data


@register_task("rmt_lm", dataclass=RMTLMConfig)
class RMTLMTask(FairseqTask):
    allow_full_bptt = False  # streams are endless: gradient must be truncated
    stream_level = True  # models carry memory across batches (RecurrentLM), not per sample
    def __init__(self, cfg: RMTLMConfig, dictionary: Dictionary):
        super().__init__(cfg)
        self.dictionary = dictionary
        check((cfg.bptt_unroll is None and self.allow_full_bptt) or (cfg.bptt_unroll or 0) >= 0,
              f"--bptt-unroll must be >= 0, got {cfg.bptt_unroll}")
        check(str(cfg.bptt_mode) in BPTT_MODES, f"--bptt-mode must be one of {BPTT_MODES}, got {cfg.bptt_mode}")
        R = getattr(cfg, "memory_reset_interval", None)
        check(R is None or R >= 0, f"--memory-reset-interval must be >= 0 segments (0: never), got {R}")
        check(getattr(cfg, "eval_segments_per_batch", 1) >= 1,
              f"--eval-segments-per-batch must be >= 1, got {getattr(cfg, 'eval_segments_per_batch', 1)}")
        if cfg.tokens_per_sample is not None:
            check(cfg.tokens_per_sample >= 1, f"--tokens-per-sample must be >= 1, got {cfg.tokens_per_sample}")
        if cfg.batch_size is not None:
            check(cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}")
        check_no_max_tokens(cfg, "rmt_lm", "--batch-size streams x --tokens-per-sample tokens per segment; size it "
                                           "with those two")
        check(not getattr(cfg, "add_bos_token", False), "--add-bos-token does not apply to --task rmt_lm: its streams "
                                                        "are read as they are (use --task language_modeling)")
        self.states = {}  # split -> RecurrentState
        # fairseq-preprocess pads the dictionary to a multiple of 8 with madeupwordNNNN entries: not symbols
        self.char_level = all(len(dictionary[i]) == 1 or dictionary[i].startswith("madeupword")
                              for i in range(dictionary.nspecial, len(dictionary)))

    @classmethod
    def setup_task(cls, cfg: RMTLMConfig, **kwargs):
        paths = utils.split_paths(cfg.data) if cfg.data not in (None, "???") else []
        check(len(paths) > 0, "no data directory given (the first positional argument, DATA)")
        check(os.path.exists(paths[0]), f"data directory {paths[0]!r} does not exist")
        check(os.path.isdir(paths[0]), f"data directory {paths[0]!r} is a file, not a directory: pass the "
                                       f"--destdir of fairseq-preprocess")
        dict_path = os.path.join(paths[0], "dict.txt")
        check(os.path.isfile(dict_path), f"{dict_path} not found: is {paths[0]!r} a fairseq-preprocess output?")
        try:
            dictionary = Dictionary.load(dict_path)
        except ValueError as e:  # fairseq's message quotes part of the line only
            raise RMTConfigError(f"{dict_path} is not a fairseq dictionary: {_bad_dictionary_line(dict_path) or e}; "
                                 f"re-run fairseq-preprocess") from None
        logger.info("dictionary: %d types", len(dictionary))
        task = cls(cfg, dictionary)
        checkpoints_to_load = _linked(cfg, "path")
        if checkpoints_to_load and not kwargs.get("from_checkpoint"):
            # fairseq-eval-lm / -interactive / -generate --path: named here rather than by a traceback
            for path in utils.split_paths(checkpoints_to_load):
                task.check_checkpoint(path, f"--path {path}")
        return task

    # ---- configuration shared with model and criterion -----------------------------------------------------

    @property
    def seg_len(self) -> int:
        return self.cfg.tokens_per_sample or DEFAULT_SEGMENT_LEN

    @property
    def bptt_unroll(self) -> int:
        return self.cfg.bptt_unroll

    @property
    def bptt_mode(self) -> str:
        return str(self.cfg.bptt_mode)

    def build_model(self, cfg, from_checkpoint=False):
        # the model resolves the segment length (the trained one from its checkpoint unless --tokens-per-sample is
        # given) and sets it here when the flag was not given: batches are cut to what the model runs
        resume = None if from_checkpoint else self._resume_checkpoint()
        fallback = (checkpoints.fallback_for(resume[0], getattr(self.cfg, "restore_fallback", False))
                    if resume is not None else None)
        if fallback is not None:  # the file fairseq's loader will load in place of an unreadable one: checked as it
            resume = (fallback, f"{fallback} (--restore-fallback's choice for the unreadable {resume[0]})", resume[2])
        if resume is not None:
            self._continue_as_trained(resume[0], cfg)
        model = super().build_model(cfg, from_checkpoint)
        decoder = getattr(model, "decoder", None)
        check(hasattr(decoder, "forward_segment"),
              f"--task {self._name()} runs rmt_lm models (--arch rmt_*, transformer_xl_*), got --arch "
              f"{getattr(cfg, '_name', None)} ({type(model).__name__})")
        if self.bptt_mode == "sliding" and (self.bptt_unroll or 0) > 0:
            check(decoder is not None and carries_memory(decoder),
                  f"--bptt-mode sliding needs recurrent memory (--mem-tokens > 0 with --memory-layout rmt, or "
                  f"--associative-memory), got --mem-tokens {getattr(cfg, 'mem_tokens', 0)}")
        if not from_checkpoint:
            check_memory_can_learn(decoder, self.bptt_unroll)
        if carries_memory(decoder) and self.bptt_unroll == 0:
            logger.warning("--bptt-unroll 0 with memory tokens: write memory receives no gradient; use >= 1")
        if resume is not None:
            path, source, continues = resume
            self.check_checkpoint(path, source, model=model, resume=continues)
        if not from_checkpoint:  # fairseq-train (rmt-deepspeed-train too): what trains, once, on rank 0
            logger.info("training with %s", self.run_summary(model))
        return model

    def run_summary(self, model) -> str:
        """Memory kind, segment length, streams and BPTT unroll of the run, in one line ("memory: ...; ...")."""
        K = self.bptt_unroll or 0
        bptt = bptt_summary(model.decoder, K, self.bptt_mode, segments_per_batch(self.bptt_mode, K))
        R = getattr(model, "memory_reset_interval", None)  # the model's forward applies it (models/recurrent_lm.py)
        if R:
            bptt += f"; streams restart their memory every {R} segments, in training and " \
                    f"evaluation (--memory-reset-interval{'' if self.cfg.memory_reset_interval else ', ARMT default'})"
        return training_summary(model.decoder, f"segment {self.seg_len} tokens (--tokens-per-sample)",
                                self.cfg.batch_size, "streams", bptt)

    @staticmethod
    def _continue_as_trained(path: str, cfg) -> None:
        """fairseq-train builds the model of the flags, then loads the checkpoint into it. An rmt_lm checkpoint
        written before a behaviour switch existed (models/rmt_lm.py LEGACY_VALUES: memory dropout, which memory
        rows see the XL cache, the embedding modules) continues with what it was trained with: its values go into
        the config fairseq builds from and saves, and are logged."""
        from fairseq.models import ARCH_MODEL_REGISTRY
        from omegaconf import OmegaConf, open_dict

        from rmt_fairseq.models.rmt_lm import RMTLanguageModel
        from rmt_fairseq.models.trained_with import LEGACY_VALUES

        if "://" in path or not os.path.isfile(path) or not OmegaConf.is_config(cfg):
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            saved = state["cfg"]["model"]
        except Exception:
            return  # not a readable fairseq checkpoint with a config: check_checkpoint says what it is
        family = ARCH_MODEL_REGISTRY.get(_saved(state, "model", "_name"))
        if saved is None or not (isinstance(family, type) and issubclass(family, RMTLanguageModel)):
            return
        missing = {k: v for k, v in LEGACY_VALUES.items() if k not in saved}
        if missing:
            with open_dict(cfg):
                for k, v in missing.items():
                    cfg[k] = v
            logger.info("%s was written before %s existed: continuing it as trained (%s)", path,
                        ", ".join("--" + k.replace("_", "-") for k in missing),
                        ", ".join(f"{k}={v}" for k, v in missing.items()))

    # ---- checkpoints: checked before fairseq loads them --------------------------------------------------------

    resumes_streams = True  # a mid-epoch checkpoint continues stateful streams (rmt_algorithmic: no)

    def _name(self) -> str:
        from fairseq.tasks import TASK_REGISTRY

        return next((n for n, c in TASK_REGISTRY.items() if c is type(self)), type(self).__name__)

    def _resume_checkpoint(self):
        """(file, how it was given, whether the run continues from its position) for the checkpoint
        fairseq-train is about to load, as fairseq's checkpoint_utils.load_checkpoint picks it; None if none."""
        restore, save_dir = _linked(self.cfg, "restore_file"), _linked(self.cfg, "save_dir")
        if restore is None or save_dir is None or "://" in restore + save_dir:
            return None
        suffix = _linked(self.cfg, "checkpoint_suffix") or ""
        last = os.path.join(save_dir, f"checkpoint_last{suffix}.pt")
        reset = bool(_linked(self.cfg, "reset_dataloader"))
        if restore == "checkpoint_last.pt":
            if os.path.exists(last):
                return last, f"{last} (the last checkpoint in --save-dir, resumed automatically)", not reset
            finetune = _linked(self.cfg, "finetune_from_model")
            if finetune is None:
                return None  # a new run
            check(os.path.exists(finetune), f"--finetune-from-model {finetune}: no such file")
            return finetune, f"--finetune-from-model {finetune}", False
        path = restore.replace(".pt", suffix + ".pt")
        if not os.path.exists(path) and os.path.abspath(path) == os.path.abspath(last):
            return None  # checkpoint_last.pt of --save-dir spelled out: a first launch starts a new run
        check(os.path.exists(path), f"--restore-file {restore}: no such file (fairseq-train would silently start "
                                    f"from scratch); give an existing checkpoint, or drop the flag for a new run")
        return path, f"--restore-file {path}", not reset

    def check_checkpoint(self, path: str, source: str, model=None, resume: bool = False) -> None:
        """Stop with one line naming the file (`source`) if the checkpoint cannot serve this task and data:
        not a fairseq checkpoint, another model family, another vocabulary; with the model of the flags, other
        parameter shapes; when resuming, another task, or a mid-epoch position whose streams or memory state
        do not match. An unreadable file is left to fairseq's loader (rmt_fairseq/checkpoints.py names it)."""
        from fairseq.models import ARCH_MODEL_REGISTRY

        from rmt_fairseq.models.recurrent_lm import RecurrentLM
        from rmt_fairseq.models.trained_with import check_fingerprint, check_vocabulary

        if "://" in path:
            return
        if os.path.isdir(path):
            import glob

            deepspeed_dir = (glob.glob(os.path.join(path, "*model_states.pt"))
                             or glob.glob(os.path.join(path, "*", "*model_states.pt")))
            check(not deepspeed_dir, f"{source} is a DeepSpeed checkpoint directory, not a fairseq checkpoint: "
                                     f"rmt-deepspeed-train writes fairseq's checkpoint_*.pt files into its --save-dir "
                                     f"(rank 0's hold the model); pass one of those")
        check(os.path.isfile(path), f"{source}: no such file")
        try:  # mmap: only what is looked at is read, so a large checkpoint costs little here
            state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception:
            return
        check(not (isinstance(state, dict) and state.get("model") is None
                   and "deepspeed" in (state.get("last_optimizer_state") or {})),
              f"{source} holds one DeepSpeed rank's optimizer state, not the model (rmt-deepspeed-train's -shard<r> "
              f"files): pass the same name without -shard<r>, rank 0's file")
        check(isinstance(state, dict) and isinstance(state.get("model"), dict)
              and (state.get("cfg") is not None or state.get("args") is not None),
              f"{source} is not a fairseq checkpoint (no 'model' and 'cfg' entries; a bare state dict?): load "
              f"it into a model and save it with fairseq's checkpoint_utils, or give a checkpoint fairseq wrote")
        name, again = self._name(), ("use another --save-dir" if "--save-dir" in source else "give another file")
        arch, saved_task = _saved(state, "model", "_name"), _saved(state, "task", "_name")
        family = ARCH_MODEL_REGISTRY.get(arch)
        check(family is not None and issubclass(family, RecurrentLM),
              f"{source} holds a {arch} model ({family.__name__ if family else 'not registered'}, trained with "
              f"--task {saved_task}), not an rmt_lm or rmt_transformer_lm one: --task {name} cannot run it; "
              f"{again}" + (f" (to add memory to it: --arch rmt_{arch} --lm-path {path})"
                            if family is not None and family.__name__ == "TransformerLanguageModel" else ""))
        if resume:
            check(saved_task == name, f"{source} was written by --task {saved_task}, not --task {name}: its data "
                                      f"position does not apply; pass --reset-dataloader (and --reset-optimizer) to "
                                      f"start from its weights only, or {again}")
        dict_file = os.path.join(utils.split_paths(self.cfg.data)[0], "dict.txt")
        check_vocabulary(state["model"], len(self.dictionary), source, dict_file)
        check_fingerprint(_saved(state, "model", "dictionary_fingerprint"), self.dictionary, source, dict_file)
        if model is None:
            return
        mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in state["model"].items()}
        if mine != theirs:
            cfg = getattr(model, "cfg", None)
            diffs = [f"--{k.replace('_', '-')} {_saved(state, 'model', k)} vs {getattr(cfg, k, None)}"
                     for k in STRUCTURAL_FIELDS
                     # a field the checkpoint predates (None) says nothing about what differs
                     if _saved(state, "model", k) is not None and _saved(state, "model", k) != getattr(cfg, k, None)]
            if not diffs:
                key = sorted(set(mine) ^ set(theirs)) or [k for k in sorted(mine) if mine[k] != theirs[k]]
                diffs = [f"parameter {key[0]} {theirs.get(key[0])} vs {mine.get(key[0])}"]
            flags_arch = getattr(cfg, "_name", None)
            raise RMTConfigError(f"{source} (--arch {arch}) does not fit the model of these flags"
                                 f"{f' (--arch {flags_arch})' if flags_arch != arch else ''}: {', '.join(diffs)} "
                                 f"(checkpoint vs flags); pass the checkpoint's values, or {again}")
        if resume and self.resumes_streams:
            self._check_stream_position(state, source, model)

    def _check_stream_position(self, state, source: str, model) -> None:
        """A mid-epoch checkpoint continues every stream at its batch: the streams must be cut as they were
        (same count, segment length and segments per batch) and their memory state must be in the file."""
        extra = state.get("extra_state") or {}
        itr = extra.get("train_iterator") or {}
        batches = int(itr.get("iterations_in_epoch", 0) or 0)
        decoder = model.decoder
        stateful = carries_memory(decoder) or getattr(decoder, "mem_len", 0) > 0
        train_state = (extra.get(type(self).__name__) or {}).get("train_state")
        if batches == 0:
            if stateful and train_state is None:
                logger.warning(f"{source} holds no memory state of the training streams; it was saved at an epoch "
                               f"boundary, where memory starts fresh anyway, so resuming is exact")
            return
        where = f"stopped in epoch {itr.get('epoch')} after {batches} batches"
        # the streams as the checkpoint's run cut them (data/streams.py): B x ranks streams, batches of S x T
        batch_size, unroll, mode = (_saved(state, "task", k) for k in ("batch_size", "bptt_unroll", "bptt_mode"))
        ranks = (_saved(state, "task", "data_parallel_size")
                 or _saved(state, "distributed_training", "distributed_world_size") or 1)
        saved = {"streams": (batch_size or 0) * ranks,
                 "T": _saved(state, "task", "tokens_per_sample") or DEFAULT_SEGMENT_LEN,
                 "S": segments_per_batch(mode, unroll)}
        _, size = self._parallel()
        now = {"streams": (self.cfg.batch_size or 0) * size, "T": self.seg_len,
               "S": self.segments_per_batch(self.cfg.train_subset)}
        diffs = []
        if saved["streams"] != now["streams"]:
            diffs.append(f"{saved['streams']} streams (--batch-size {batch_size} x {ranks} ranks) vs {now['streams']} "
                         f"(--batch-size {self.cfg.batch_size} x {size})")
        if saved["T"] != now["T"]:
            diffs.append(f"--tokens-per-sample {saved['T']} vs {now['T']}")
        if saved["S"] != now["S"]:
            diffs.append(f"{saved['S']} segments per batch (--bptt-unroll {unroll} --bptt-mode {mode}) vs "
                         f"{now['S']} (--bptt-unroll {self.bptt_unroll} --bptt-mode {self.bptt_mode})")
        check(not diffs, f"{source} {where} of streams cut differently: {'; '.join(diffs)} (checkpoint vs flags); "
                         f"resuming would not continue the streams where they stopped: pass the checkpoint's "
                         f"values, or --reset-dataloader to start the epoch over")
        check(train_state is not None or not stateful,
              f"{source} {where}, but holds no memory state of the training streams (extra_state has no "
              f"{type(self).__name__} train_state: exported from DeepSpeed, or written by another tool): resuming "
              f"would restart memory in the middle of every stream; pass --reset-dataloader to start the epoch over "
              f"with fresh memory")

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
        """(this process's data-parallel rank, the number of ranks): its share of the streams."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            # one process reads every stream, whatever a config loaded from a checkpoint says (fairseq-validate
            # builds the task from it, and a DeepSpeed checkpoint's holds the rank that saved it: 0 of N)
            self.cfg.data_parallel_rank, self.cfg.data_parallel_size = 0, 1
        elif self.cfg.data_parallel_rank is None or self.cfg.data_parallel_size is None:
            self.cfg.data_parallel_rank = dist_utils.get_data_parallel_rank()
            self.cfg.data_parallel_size = dist_utils.get_data_parallel_world_size()
        return self.cfg.data_parallel_rank, self.cfg.data_parallel_size

    def segments_per_batch(self, split: str) -> int:
        if split == self.cfg.train_subset:
            return segments_per_batch(self.bptt_mode, self.bptt_unroll)
        return int(getattr(self.cfg, "eval_segments_per_batch", 1) or 1)

    def load_dataset(self, split, epoch=1, combine=False, streams=None, **kwargs):
        paths = utils.split_paths(self.cfg.data)
        split_path = os.path.join(paths[(epoch - 1) % len(paths)], split)
        data = load_split(split_path, split, self.dictionary, combine=combine)
        is_train = split == self.cfg.train_subset
        B = streams or (self.cfg.batch_size if is_train else (self.cfg.batch_size_valid or self.cfg.batch_size))
        check(B is not None, "--task rmt_lm needs --batch-size (the number of parallel streams per rank)")
        rank, size = self._parallel()
        self.datasets[split] = StreamDataset(
            flatten_indexed_dataset(data), streams_per_shard=B, seg_len=self.seg_len,
            segments_per_batch=self.segments_per_batch(split), split=split, shard_id=rank, num_shards=size, owner=data,
        )
        ranks = f" on each of {size} ranks ({B * size} streams in all)" if size > 1 else ""
        S = self.segments_per_batch(split)
        logger.info("%s: %d streams%s x %d tokens, %d batches of %d segment%s of %d", split, B, ranks,
                    self.datasets[split].stream_len, len(self.datasets[split]), S, "" if S == 1 else "s", self.seg_len)

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
        from rmt_fairseq.models.recurrent_lm import StreamStates

        itr = self.get_batch_iterator(dataset, num_workers=num_workers, data_buffer_size=data_buffer_size
                                      ).next_epoch_itr(shuffle=False)
        # fairseq-eval-lm's SequenceScorer only calls model(**net_input): the pass's recurrent state travels in
        # the batches (one StreamStates per pass, one state per model of an ensemble), never on the model
        streams = StreamStates()

        def batches():
            for sample in itr:
                sample["net_input"]["rmt_state"] = streams
                yield sample

        return iterators.CountingIterator(batches(), start=0, total=len(itr))

    # ---- recurrent state -----------------------------------------------------------------------------------

    def state_for(self, sample, mode: str) -> RecurrentState:
        """The state of `mode` ("train" or "valid") on the sample's split, reset on the first batch of a pass
        (batch_index 0); the model's forward restarts it every --memory-reset-interval segments (models/
        recurrent_lm.py). Keyed by both, so validating on the training split (--valid-subset train) never touches
        the training streams' memory."""
        key = (mode, sample["split"])
        if sample["batch_index"] == 0 or key not in self.states:
            self.states[key] = RecurrentState()
        return self.states[key]

    def run_step(self, mode: str, sample, step):
        """Pass the streams' state in (sample["rmt_state"]), run `step` (fairseq's train/valid step, whose
        criterion calls the model's forward), keep the state the forward returned."""
        key = (mode, sample["split"])
        sample["rmt_state"] = self.state_for(sample, mode)
        result = step()
        self.states[key] = sample["rmt_state"]  # the criterion puts the returned state back into the sample
        return result

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        sample["rmt_update"] = update_num + 1  # the update this batch belongs to (error messages)
        step = lambda: super(RMTLMTask, self).train_step(sample, model, criterion, optimizer,  # noqa: E731
                                                         update_num, ignore_grad)
        if ignore_grad:  # a dummy batch must not touch the streams' state
            sample["rmt_state"] = RecurrentState()
            return step()
        return self.run_step("train", sample, step)

    def valid_step(self, sample, model, criterion):
        return self.run_step("valid", sample, lambda: super(RMTLMTask, self).valid_step(sample, model, criterion))

    def train_state(self) -> Optional[RecurrentState]:
        return self.states.get(("train", self.cfg.train_subset))

    def gather_train_states(self) -> None:
        """Collect every data-parallel rank's training-stream state into one state of all G streams (in rank
        order, the order data/streams.py cuts them), so that the checkpoint rank 0 writes holds every rank's
        own streams. A collective: called on every rank before fairseq saves (rmt_fairseq/distributed.py)."""
        self._gathered = None
        rank, size = self._parallel()
        if size <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        mine = self.train_state()
        mine = utils.move_to_cpu(mine.state_dict()) if mine is not None else None
        parts = [None] * size
        torch.distributed.all_gather_object(parts, mine, group=dist_utils.get_data_parallel_group())
        if all(p is not None for p in parts):
            self._gathered = concat_states(parts)

    def get_checkpoint_dict(self):
        """The training streams' state, all G = --batch-size x ranks streams (data/streams.py's order)."""
        rank, size = self._parallel()
        state = getattr(self, "_gathered", None)
        self._gathered = None
        if state is None and size == 1 and self.train_state() is not None:
            state = self.train_state().state_dict()
        return {self.__class__.__name__: {"train_state": state}}

    def set_checkpoint_dict(self, state):
        """Each rank takes its own rows of the saved streams: a run may resume with another split of the same
        streams over ranks (--batch-size 8 on 1 rank -> --batch-size 4 on 2 ranks)."""
        saved = state.get("train_state")
        if saved is None:
            return
        rank, size = self._parallel()
        B = self.cfg.batch_size
        n = num_streams(saved)
        if n is not None:
            check(B is not None and n == B * size,
                  f"the checkpoint holds the memory of {n} streams, this run has {size} ranks x --batch-size {B}: "
                  f"resume with --batch-size x ranks = {n}, or pass --reset-dataloader to start the epoch over "
                  f"with fresh memory")
            saved = slice_state(saved, rank * B, (rank + 1) * B)
        st = RecurrentState()
        st.load_state_dict(saved)
        self.states[("train", self.cfg.train_subset)] = st

    # ---- generation: fairseq-interactive and the hub interface's sample() -------------------------------------

    def build_dataset_for_inference(self, src_tokens, src_lengths, **kwargs):
        """Prompts (one per line, </s> dropped so generation continues them) for SequenceGenerator; the model
        decodes across segment boundaries with incremental decoding inside a segment (models/rmt_lm.py)."""
        unknown = unknown_prompt_message(src_tokens, self.source_dictionary)  # fairseq itself says nothing
        if unknown:
            logger.warning(unknown)
        return PromptDataset(src_tokens, self.source_dictionary)

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        check(constraints is None, "--constraints is not supported with --task rmt_lm")
        from fairseq.sequence_scorer import SequenceScorer

        if isinstance(generator, SequenceScorer):  # the hub's score(): every token of each text, fresh memory
            with torch.no_grad():
                return generator.generate(models, scoring_sample(sample, self.source_dictionary.eos(),
                                                                 self.source_dictionary.pad()))
        with torch.no_grad():
            if prefix_tokens is None and sample["net_input"]["src_tokens"].nelement():
                prefix_tokens = sample["net_input"]["src_tokens"]  # the prompt is forced, then generation
                longest, max_len = int(sample["net_input"]["src_lengths"].max()), getattr(generator, "max_len_b", None)
                if isinstance(max_len, int) and getattr(generator, "max_len_a", 0) == 0 and longest > max_len:
                    logger.warning("a prompt of %d tokens is longer than --max-len-b %d (which counts the prompt): "
                                   "its hypotheses are its first %d tokens; raise --max-len-b", longest, max_len,
                                   max_len)
            return generator.generate(models, sample, prefix_tokens=prefix_tokens,
                                      bos_token=self.source_dictionary.eos())  # </s> starts a line, as in training

    @property
    def source_dictionary(self):
        return self.dictionary

    @property
    def target_dictionary(self):
        return self.dictionary


def scoring_sample(sample, eos: int, pad: int) -> dict:
    """A PromptDataset batch as a teacher-forced one: source </s> t1 .. t(n-1), target t1 .. tn (the text as
    encoded without its final </s>, as fairseq's language_modeling scores a text in the hub's score()), read
    as a line of the training streams is read after the previous </s>."""
    tgt = sample["target"]  # B x n, right-padded
    src = torch.cat([tgt.new_full((tgt.size(0), 1), eos), tgt[:, :-1]], dim=1)  # B x n
    src = src.masked_fill(tgt.eq(pad), pad)
    lengths = tgt.ne(pad).sum(1)
    return {**sample, "net_input": {"src_tokens": src, "src_lengths": lengths}, "ntokens": int(lengths.sum())}


class PromptDataset(FairseqDataset):
    """fairseq-interactive's and the hub interface's texts, their final </s> dropped: prompts to continue
    (net_input) and the same tokens to score (target)."""

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
                "net_input": {"src_tokens": toks, "src_lengths": torch.tensor([len(self.prompts[i]) for i in items])},
                "target": toks}
