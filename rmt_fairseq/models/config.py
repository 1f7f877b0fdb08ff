"""What the three families' configs share, each field defined once: the memory flags (`MemoryConfig`, the scheme
they select: modules/schemes.py), per-sample recurrence for the two LM families (`SegmentConfig`), what a model
records when built for training (`TrainedWithConfig`), ARMT's preset values (`ARMT_PRESET`), and the checks of
those flags and of adaptive cutoffs (one `error:` line each).
"""

import logging
from dataclasses import dataclass, field
from typing import List, Optional

from fairseq import options
from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from rmt_fairseq.errors import RMTConfigError, check
from rmt_fairseq.modules import associative
from rmt_fairseq.modules.recurrence import DEFAULT_SEGMENT_LEN, SCHEDULES
from rmt_fairseq.modules.schemes import GATE_INPUTS, GATED_LAYOUTS, LAYOUTS

logger = logging.getLogger(__name__)

MEMORY_LAYOUTS = ChoiceEnum(list(LAYOUTS))
GATE_INPUT_CHOICES = ChoiceEnum(list(GATE_INPUTS))
STATE_DTYPES = ChoiceEnum(list(associative.STATE_DTYPES))
WRITE_RULES = ChoiceEnum(list(associative.WRITE_RULES))
SCHEDULE_CHOICES = ChoiceEnum(list(SCHEDULES))  # the segment loop's schedules (modules/recurrence.py)

# ARMT's values in every family's ARMT presets (armt_*): DPFP's nu as in the paper, the diagonal schedule (exact) for
# inference; `ARMT_BASE` adds this project's defaults for the base-size presets (the authors' scripts set D_MEM and
# MEMORY_SIZE per run)
ARMT_PRESET = dict(associative_memory=True, dpfp_nu=3, inference_schedule="diagonal")
ARMT_BASE = dict(ARMT_PRESET, d_mem=64, mem_tokens=16)
# --task rmt_lm restarts an ARMT model's streams every this many segments, in training and evaluation, unless
# --memory-reset-interval says otherwise (issue 29; models/recurrent_lm.py applies it). Trained on never-restarted
# streams, ARMT lost its way from the empty memory evaluation starts with (benchmarks/results/char_lm.json row
# armt5_k1_r0); with the parallel write the matrix also grew without bound there. Chosen on validation among 4, 16
# and 64 (examples/custom-corpus variants).
ARMT_MEMORY_RESET_INTERVAL = 16


@dataclass
class TrainedWithConfig(FairseqDataclass):
    """What a model records when it is built for training (RecurrentLM.setup_from_task; written into the config
    fairseq saves by rmt_fairseq/compat.py) and every tool that loads its checkpoint uses or checks. Shared by
    the configs of both LM families."""

    dictionary_fingerprint: Optional[str] = field(
        default=None,
        metadata={"help": "set when the model is built for training: sha256 (16 hex digits) of the training "
                  "dictionary's symbols in order; a model loaded with another dict.txt (any order or size) stops "
                  "with an error naming both"},
    )
    trained_segment_len: Optional[int] = field(
        default=None,
        metadata={"help": "set when the model is built for training: the segment length it trains with (--segment-len, "
                  "or --tokens-per-sample under --task rmt_lm); every tool that loads the checkpoint uses it unless "
                  "given another"},
    )
    checkpoint_file: Optional[str] = field(
        default=None, metadata={"help": "set by the checkpoint loader (rmt_fairseq/checkpoints.py): the file this "
                                "config was read from, named in the error lines of the checks above; not a flag"},
    )
    trained_memory_reset_interval: Optional[int] = field(
        default=None,
        metadata={"help": "set when the model is built for training under --task rmt_lm: the segments after which "
                  "its streams' memory starts afresh (0: never; --memory-reset-interval, or ARMT's default); "
                  "validation, fairseq-eval-lm and the hub restart there too unless given --memory-reset-interval"},
    )
    trained_tokens_per_sample: Optional[int] = field(
        default=None, metadata={"help": "set when the model is built for training under a per-sample task: its "
                                "sample length (a different one at evaluation is logged)"},
    )


@dataclass
class MemoryConfig(FairseqDataclass):
    """The memory flags of the three model families (modules/schemes.py picks the scheme from them) and the
    inference schedule (modules/recurrence.py)."""

    mem_tokens: int = field(
        default=10,
        metadata={"help": "memory tokens M per segment (where they sit and what they carry: --memory-layout, "
                  "--associative-memory); 0 = none"},
    )
    memory_layout: MEMORY_LAYOUTS = field(
        default="rmt",
        metadata={"help": "rmt: memory read before each segment and written after it, carried to the next (an "
                  "encoder reads and writes the same slots); mt: memory tokens read only, nothing carried (the "
                  "paper's MT ablation); gated: rmt with a learned update gate mixing the written memory with "
                  "the memory read; gated_hard: the same with a hard-sigmoid gate, so a closed slot keeps its memory "
                  "exactly over any length (modules/schemes.py)"},
    )
    memory_gate_bias: Optional[float] = field(
        default=None,
        metadata={"help": "--memory-layout gated, gated_hard: the update gate's initial bias b_z (default 0: the gate "
                  "starts half open). Negative starts the memory keeping what it holds, as a forget-gate bias "
                  "does for an LSTM (Gers et al. 2000; Jozefowicz et al. 2015), e.g. -2: a hard gate writes 1/6 "
                  "at the start; gated_hard needs a value in (-3, 3), where its gradient is not zero"},
    )
    memory_gate_input: GATE_INPUT_CHOICES = field(
        default=GATE_INPUTS[0],
        metadata={"help": "--memory-layout gated, gated_hard: what the update gate sees: both (the written rows and "
                  "the memory read, [w; r]) or read (the memory read alone: a slot whose gate closes on every "
                  "channel sees the same input in the next segment, so it stays closed and keeps its memory over "
                  "any length, whatever the segments bring)"},
    )
    associative_memory: bool = field(
        default=False,
        metadata={"help": "ARMT: per layer an associative matrix written by the --mem-tokens memory tokens of each "
                  "segment and read by every token of the next (Rodkin et al. 2024); memory tokens are learned, "
                  "not carried"},
    )
    d_mem: int = field(default=64, metadata={"help": "--associative-memory: key dimension D before DPFP (the matrix "
                                                     "has 2 x --dpfp-nu x D rows per layer)"})
    dpfp_nu: int = field(default=3, metadata={"help": "--associative-memory: DPFP's nu (the paper's 3)"})
    associative_write: WRITE_RULES = field(
        default=associative.WRITE_RULES[0],
        metadata={"help": "--associative-memory: how the M memory tokens of a segment write: sequential (one after "
                  "another, each against the memory the ones before it left: the delta rule token by token, "
                  "Schlag et al. 2021; stays bounded on never-restarted streams) or parallel (all against the memory "
                  "before the segment, summed: the authors' code; M similar keys overshoot, the matrix grew without "
                  "bound on never-restarted --task rmt_lm streams). Equal for one memory token or orthogonal keys. "
                  "Checkpoints from before this flag load as parallel"},
    )
    associative_state_dtype: STATE_DTYPES = field(
        default="fp32",
        metadata={"help": "--associative-memory: dtype the associative state is accumulated in: fp32 (also under "
                  "--bf16/--fp16) or model (the model's dtype)"},
    )
    inference_schedule: SCHEDULE_CHOICES = field(
        default="sequential",
        metadata={"help": "without gradients (validation, eval-lm, generation's completed segments, "
                  "rmt-extrapolate*): sequential, or diagonal (Sivtsov et al. 2025: the (segment, layer) grid by "
                  "anti-diagonals, one batched call per diagonal; exact; applies to --associative-memory, "
                  "--memory-layout mt and no memory, and rmt_lm's --mem-len; not to carried token memory (rmt, "
                  "gated), which stays sequential, nor under ZeRO-3; rmt_lm needs several segments per call: "
                  "--task rmt_lm validation and eval-lm get them with --eval-segments-per-batch)"},
    )


def with_field_defaults(cfg, dataclass_type, fill_none: bool = False):
    """cfg (argparse Namespace or OmegaConf) with every field of `dataclass_type` it lacks set to the field's default
    (with `fill_none`, also those it holds as None; interpolations such as II("task.x") are left out): a checkpoint
    written before a field existed, a stock fairseq preset that knows none of this plugin's fields. fairseq merges
    dataclass defaults only when --arch is the model's name, not for presets."""
    from omegaconf import OmegaConf, open_dict

    is_config = OmegaConf.is_config(cfg)

    def lacks(k):
        absent = k not in cfg if is_config else not hasattr(cfg, k)
        return absent or (fill_none and getattr(cfg, k, None) is None)

    missing = {k: v for k, v in vars(dataclass_type()).items()
               if not k.startswith("_") and not (isinstance(v, str) and v.startswith("${")) and lacks(k)}
    if is_config:
        with open_dict(cfg):
            for k, v in missing.items():
                cfg[k] = v
    else:
        for k, v in missing.items():
            setattr(cfg, k, v)
    return cfg


@dataclass
class SegmentConfig(FairseqDataclass):
    """Per-sample recurrence under fairseq's own tasks, for both LM families."""

    segment_len: Optional[int] = field(
        default=None,
        metadata={"help": "per-sample recurrence under fairseq's own tasks (--task language_modeling): every sample "
                  "is split into segments of this many tokens, memory starts fresh per sample (default: the "
                  f"architecture's segment length, else {DEFAULT_SEGMENT_LEN}). Under --task rmt_lm segments are "
                  "--tokens-per-sample"},
    )
    segment_bptt_unroll: Optional[int] = field(
        default=None,
        metadata={"help": "per-sample recurrence: memory detached every K+1 segments of a sample (default: "
                  "gradient through the whole sample). Under --task rmt_lm: --bptt-unroll"},
    )


def validate_memory(cfg) -> None:
    """One error line for a memory flag that cannot work (any family's config)."""
    check(cfg.mem_tokens >= 0, f"--mem-tokens must be >= 0, got {cfg.mem_tokens}")
    layout = str(getattr(cfg, "memory_layout", None) or "rmt")
    check(layout in LAYOUTS, f"--memory-layout must be one of {', '.join(LAYOUTS)}, got {layout}")
    check(layout == "rmt" or cfg.mem_tokens > 0, f"--memory-layout {layout} needs --mem-tokens > 0, got --mem-tokens 0")
    gate_bias = getattr(cfg, "memory_gate_bias", None)
    if gate_bias is not None:
        check(layout in GATED_LAYOUTS,
              f"--memory-gate-bias initialises the update gate of --memory-layout {' or '.join(GATED_LAYOUTS)}; "
              f"--memory-layout {layout} has none (got --memory-gate-bias {gate_bias})")
        check(layout != "gated_hard" or -3 < gate_bias < 3,
              f"--memory-gate-bias must be in (-3, 3) for --memory-layout gated_hard (the hard sigmoid has no "
              f"gradient outside it: the gate could never move), got {gate_bias}")
    gate_input = str(getattr(cfg, "memory_gate_input", None) or GATE_INPUTS[0])
    check(gate_input in GATE_INPUTS, f"--memory-gate-input must be one of {', '.join(GATE_INPUTS)}, got {gate_input}")
    check(gate_input == GATE_INPUTS[0] or layout in GATED_LAYOUTS,
          f"--memory-gate-input chooses the update gate's input of --memory-layout {' or '.join(GATED_LAYOUTS)}; "
          f"--memory-layout {layout} has none (got --memory-gate-input {gate_input})")
    if not getattr(cfg, "associative_memory", False):
        return
    check(cfg.d_mem >= 1, f"--d-mem must be >= 1, got {cfg.d_mem}")
    check(cfg.dpfp_nu >= 1, f"--dpfp-nu must be >= 1, got {cfg.dpfp_nu}")
    check(cfg.mem_tokens > 0, f"--associative-memory needs memory tokens to write it: --mem-tokens must be > 0, got "
                              f"{cfg.mem_tokens}")
    check(layout == "rmt",
          f"--associative-memory writes from memory tokens at the end of each segment: --memory-layout "
          f"{layout} has none (use --memory-layout rmt)")


# rmt_wt103's last cutoff, 200000, is 3/4 of WikiText-103's vocabulary (267,735 types): cutoffs suggested for another
# vocabulary keep the bands' ratios and put the last cutoff at the same place
LAST_CUTOFF_SHARE = 0.75


def fitting_cutoffs(cutoffs: List[int], vocab_size: int) -> Optional[List[int]]:
    """`cutoffs` scaled so that the last is LAST_CUTOFF_SHARE of `vocab_size`, rounded and kept increasing from 1;
    None when the vocabulary is too small for that many bands."""
    fit = []
    for c in cutoffs:
        fit.append(max(round(c * LAST_CUTOFF_SHARE * vocab_size / cutoffs[-1]), fit[-1] + 1 if fit else 1))
    return fit if fit[-1] < vocab_size else None


def check_cutoffs(cfg, vocab_size: int, flags, up_to_vocab: bool = False) -> None:
    """Adaptive input / softmax cutoffs (`flags`: (flag, value or None) pairs) that are increasing and below the
    vocabulary size (or equal to it, `up_to_vocab`: fairseq's own modules take that); otherwise one line naming the
    flag, its value (and the --arch preset that set it), with cutoffs that fit this vocabulary for every flag that
    does not."""
    bad = []
    for flag, value in flags:
        if value is None:
            continue
        try:
            cut = options.eval_str_list(value, type=int)
        except Exception:
            check(False, f"{flag} must be comma-separated integers, got {value!r}")
        increasing = all(a < b for a, b in zip([0] + cut, cut))
        if not (increasing and cut[-1] < vocab_size + up_to_vocab):
            bad.append((flag, value, fitting_cutoffs(cut, vocab_size) if increasing else None))
    if not bad:
        return
    flag, value, _ = bad[0]
    arch = _preset_setting(cfg, flag)
    bound = "at most" if up_to_vocab else "smaller than"
    text = f"{flag} {value}{f' (set by --arch {arch})' if arch else ''}: cutoffs must be increasing and {bound} the " \
           f"vocabulary size ({vocab_size})"
    fits = " ".join(f + " " + ",".join(map(str, fit)) for f, _, fit in bad if fit is not None)
    if fits:
        text += (f"; for this vocabulary pass e.g. {fits} (the same bands scaled so that the last cutoff is "
                 f"{LAST_CUTOFF_SHARE:.0%} of the vocabulary, as rmt_wt103's 200000 is of WikiText-103's 267,735 "
                 f"types)")
    raise RMTConfigError(text)


def _preset_setting(cfg, flag: str) -> Optional[str]:
    """The --arch preset of `cfg` when it sets `flag` to the value cfg has (the user may not have typed it)."""
    import argparse

    from fairseq.models import ARCH_CONFIG_REGISTRY

    arch = getattr(cfg, "_name", None) or getattr(cfg, "arch", None)
    if arch not in ARCH_CONFIG_REGISTRY:
        return None
    key = flag.lstrip("-").replace("-", "_")
    preset = argparse.Namespace(task=getattr(cfg, "task", None))
    try:
        ARCH_CONFIG_REGISTRY[arch](preset)
    except Exception:  # a preset reading a field this namespace lacks: say nothing about it
        return None
    return arch if getattr(preset, key, None) is not None and getattr(preset, key) == getattr(cfg, key, None) else None


def cutoffs_of(cfg) -> List[int]:
    """--adaptive-softmax-cutoff as integers ([] when unset)."""
    return options.eval_str_list(cfg.adaptive_softmax_cutoff, type=int) if cfg.adaptive_softmax_cutoff else []


def fill(args, values: dict) -> None:
    """A preset's values into `args` (argparse Namespace or config), each only where `args` has none: a flag given on
    the command line (or a field of a hydra yaml) wins."""
    for k, v in values.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


def register_presets(model: str, table: dict, adjust=None) -> None:
    """Register a family's preset table {--arch name: (values, docstring[, a preset function run after them])} with
    fairseq (register_model_architecture). `adjust(args, values)` may rewrite a copy of the values per call (rmt_lm:
    the segment length's flag depends on the task)."""
    from fairseq.models import register_model_architecture

    for name, (values, doc, *then) in table.items():
        def preset(args, values=values, then=then):
            values = dict(values)
            if adjust is not None:
                adjust(args, values)
            fill(args, values)
            for function in then:
                function(args)

        preset.__name__, preset.__doc__ = name, doc
        register_model_architecture(model, name)(preset)
