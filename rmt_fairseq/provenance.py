"""Where a measured number comes from: the commit, the command and the machine, saved next to the number.

Scripts that write results JSON (rmt-demo, benchmarks/*.py, examples/*/run.sh) add `provenance()` under the key
"provenance"; benchmarks/docs_blocks.py prints it beside every number it puts in the docs.
"""

import datetime
import os
import platform
import shlex
import subprocess
import sys
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args) -> Optional[str]:
    try:
        p = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def provenance(argv=None) -> dict:
    """{"commit": HEAD or None outside a git checkout, "uncommitted_changes": bool (tracked files only),
    "command": the command line, "date": ISO 8601 UTC, "machine": CPUs, torch version and GPU, if any}."""
    import torch

    argv = list(sys.argv if argv is None else argv)
    if argv:
        argv[0] = os.path.basename(argv[0]) if not argv[0].endswith(".py") else os.path.relpath(argv[0], REPO)
    status = _git("status", "--porcelain", "--untracked-files=no")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(status) if status is not None else None,
        "command": shlex.join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}"
                   + (f", {gpu}" if gpu else ", no GPU"),
    }


def write_results(path: str, result: dict) -> None:
    """Write `result` with its provenance to the JSON file `path` (folders made). The provenance is read before
    the file is opened: a results file kept in git would otherwise count as an uncommitted change of its own."""
    import json

    result = {**result, "provenance": provenance()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
