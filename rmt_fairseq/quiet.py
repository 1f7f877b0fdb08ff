"""Third-party messages that every command of this stack prints and that say nothing about the user's run.

A shrunk fairseq-train printed 17 Python warning lines (Hydra's deprecation notices for the compose API fairseq
0.12 uses, torch's pin_memory and autocast notices), DeepSpeed's "Setting accelerator to CPU" (fairseq imports
DeepSpeed for its cpu_adam) and fairseq's "Please install tensorboardX" (its text_to_speech task, imported by
every CLI), once per rank under DeepSpeed. `install()` hides exactly those messages: each filter matches one
message's text and category, so any other warning still shows. It runs when the plugin is imported (which
fairseq does after its own imports), and from the `rmt_fairseq_quiet.pth` startup hook that scripts/setup.sh
writes into the environment, which is the only way to reach the two messages printed while fairseq imports. The
hook runs this file alone (STARTUP_HOOK), not the package: importing `rmt_fairseq` registers the plugin with
fairseq, which imports fairseq, and that must not happen in every Python process of the environment.
Left alone: the deepspeed launcher's own lines and DeepSpeed's "deepspeed_shm_comm_op built successfully" (a
print() per CPU rank in deepspeed/comm/torch.py).

`restore_fairseq_logging()` undoes fairseq 0.12's own `logging.basicConfig(level=logging.DEBUG)` in
fairseq/models/wav2vec/wav2vec2_classification.py: imported before fairseq-eval-lm, -validate and -interactive set
up their logging, it made their own setup a no-op, so they printed Hydra's DEBUG lines and bare `INFO:name:msg`
lines where fairseq-train prints `date | INFO | name | msg`.

`RMT_FAIRSEQ_VERBOSE=1` in the environment turns all of this off.
"""

import logging
import os
import warnings

# (category, regex matched against the start of the message; Python's warnings.filterwarnings semantics)
PYTHON_WARNINGS = [
    # Hydra 1.3 on fairseq 0.12's hydra.experimental compose calls (fairseq/dataclass/utils.py)
    (UserWarning, r"hydra\.experimental\.(initialize|compose)\(\) is no longer experimental"),
    (UserWarning, r"\s*The version_base parameter is not specified"),
    (UserWarning, r"In '[^']*': Usage of deprecated keyword in package header"),
    (UserWarning, r"\s*'[^']*' is validated against ConfigStore schema with the same name"),
    (UserWarning, r"\s*The strict flag in the compose API is deprecated"),
    # torch on fairseq's data loader (pin_memory=True) and train_step (torch.cuda.amp) when there is no GPU
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found"),
    (FutureWarning, r"`torch\.cuda\.amp\.(autocast|GradScaler)\(args\.\.\.\)` is deprecated"),
    # torch.distributed on DeepSpeed's CPU (gloo) path and on fairseq-train's CPU ranks
    (UserWarning, r"barrier\(\): using the device under current context"),
    (UserWarning, r"No device id is provided via `init_process_group` or `barrier `"),
    # DeepSpeed's ZeRO collectives on torch 2.13 (deepspeed/comm/torch.py), once per rank
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
]

# (logger name, the start of a message hidden on it)
LOG_MESSAGES = [
    ("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."),
    # fairseq's optimizers under ZeRO-1/2/3 are tested against fairseq-train (tests/deepspeed)
    ("DeepSpeed", "**** You are using ZeRO with an untested optimizer"),
    ("fairseq.tasks.text_to_speech", "Please install tensorboardX"),
]


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not str(record.msg).startswith(self.prefix)
        except Exception:  # never let a filter break logging
            return True


_installed = False


def install() -> None:
    """Hide the messages above (idempotent); a no-op with RMT_FAIRSEQ_VERBOSE=1."""
    global _installed
    if _installed or os.environ.get("RMT_FAIRSEQ_VERBOSE", "") not in ("", "0"):
        return
    _installed = True
    for category, pattern in PYTHON_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name, prefix in LOG_MESSAGES:
        log = logging.getLogger(name)
        # the startup hook installs a copy of this module first (its own _DropMessage class): one filter a message
        if not any(getattr(f, "prefix", None) == prefix for f in log.filters):
            log.addFilter(_DropMessage(prefix))


# the line scripts/setup.sh writes to <site-packages>/rmt_fairseq_quiet.pth: this file run on its own, under another
# module name (the package's __init__ is not run), then install(); any failure leaves Python's start-up alone
STARTUP_HOOK = (
    'import sys; exec("try:\\n from importlib import util\\n import os\\n'
    " d = util.find_spec('rmt_fairseq').submodule_search_locations[0]\\n"
    " s = util.spec_from_file_location('_rmt_fairseq_startup_quiet', os.path.join(d, 'quiet.py'))\\n"
    " q = util.module_from_spec(s)\\n s.loader.exec_module(q)\\n q.install()\\n"
    'except Exception:\\n pass")'
)


FAIRSEQ_FORMAT = logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s", "%Y-%m-%d %H:%M:%S")


def restore_fairseq_logging() -> None:
    """The root logger as fairseq's CLIs mean to set it (level $LOGLEVEL, default INFO; fairseq's line format),
    when fairseq's wav2vec import left it at DEBUG with Python's default format. Nothing else is touched."""
    if os.environ.get("RMT_FAIRSEQ_VERBOSE", "") not in ("", "0"):
        return
    root = logging.getLogger()
    level = os.environ.get("LOGLEVEL", "INFO").upper()
    if root.level != logging.DEBUG or level == "DEBUG":
        return
    root.setLevel(level)
    for handler in root.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.formatter is not None \
                and handler.formatter._fmt == logging.BASIC_FORMAT:
            handler.setFormatter(FAIRSEQ_FORMAT)
