"""The plugin's command-line tools (console scripts in pyproject.toml)."""

import os
import sys


def console_script(name: str) -> str:
    """The path of console script `name` (fairseq-train, fairseq-preprocess, rmt-data ...) that the tools and the
    benchmark scripts start: the one installed beside the running interpreter, or in the folder $RMT_FAIRSEQ_BIN
    names (the test suite points it at wrappers that run each command through its fork server:
    tests/forkserver.py)."""
    return os.path.join(os.environ.get("RMT_FAIRSEQ_BIN") or os.path.dirname(sys.executable), name)
