"""`make demo` alone and beside another torch job (issue 27): the threads rule keeps it near its time alone.

    python benchmarks/shared_machine.py [--updates 2000] [--default-threads-updates 200] [--out ...json]

Runs `rmt-demo` (the README's main job) twice with the same flags: alone, then beside a busy job (a second
process multiplying 512 x 512 matrices with torch's default threads, as another user's torch job would), and
reports the wall time of each and their ratio (the issue's target: at most 3). With --default-threads-updates N,
also times N updates of the demo's training alone and beside the busy job with torch's default threads
(OMP_NUM_THREADS = the CPUs available), the behaviour before rmt_fairseq/threads.py.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import busy_job, save_json  # noqa: E402  (benchmarks/common.py)

from rmt_fairseq.cli import console_script  # noqa: E402
from rmt_fairseq.provenance import provenance  # noqa: E402
from rmt_fairseq.threads import OVERRIDES, cpus_available  # noqa: E402


def timed(cmd, env, busy):
    """Wall seconds of cmd (its output kept for the caller), with the busy job running beside it if busy."""
    with busy_job(busy):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    if p.returncode != 0:
        sys.stderr.write((p.stdout + p.stderr)[-3000:])
        raise SystemExit(f"error: {' '.join(cmd[:2])} failed with exit status {p.returncode}")
    return seconds, p.stdout + p.stderr


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--updates", type=int, default=2000, help="rmt-demo --updates (the demo's default: 2000)")
    ap.add_argument("--default-threads-updates", type=int, default=0,
                    help="also time this many training updates with torch's default threads (0: skip)")
    ap.add_argument("--out", default="benchmarks/results/shared_machine.json")
    a = ap.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k not in OVERRIDES}  # the rule's choice, as a user gets it
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for busy in (False, True):
            out = os.path.join(tmp, f"demo_{int(busy)}")
            s, log = timed([console_script("rmt-demo"), "--out", out, "--updates", str(a.updates)], env, busy)
            threads = re.findall(r"torch threads: (\d+) per process", open(os.path.join(out, "train_rmt.log")).read())
            rows.append({"run": f"rmt-demo --updates {a.updates}", "beside_busy_job": busy, "seconds": round(s, 1),
                         "torch_threads": int(threads[0]) if threads else None})
            print(f"rmt-demo --updates {a.updates} {'beside a busy job' if busy else 'alone':<18} {s:8.1f} s "
                  f"(torch threads {rows[-1]['torch_threads']})", flush=True)
        if a.default_threads_updates:
            data = os.path.join(tmp, "demo_0", "data", "bin")
            cmd = [console_script("fairseq-train"), data, "--user-dir", "user_dir", "--task", "rmt_algorithmic",
                   "--arch", "rmt_tiny", "--criterion", "rmt_cross_entropy", "--num-segments", "3", "--batch-size",
                   "32", "--cpu", "--num-workers", "0", "--mem-tokens", "8", "--optimizer", "adam", "--lr", "2e-3",
                   "--max-update", str(a.default_threads_updates), "--disable-validation", "--no-save",
                   "--log-format", "simple", "--log-interval", "1000"]
            for threads in (1, cpus_available()):
                for busy in (False, True):
                    s, _ = timed(cmd, dict(env, OMP_NUM_THREADS=str(threads)), busy)
                    rows.append({"run": f"fairseq-train, demo model, {a.default_threads_updates} updates",
                                 "beside_busy_job": busy, "seconds": round(s, 1), "torch_threads": threads})
                    print(f"{rows[-1]['run']}, {threads} thread(s), {'beside a busy job' if busy else 'alone':<18} "
                          f"{s:8.1f} s", flush=True)
    ratio = rows[1]["seconds"] / rows[0]["seconds"]
    print(f"demo beside a busy job / alone: {ratio:.2f}x (target: at most 3x)")
    result = {"cpus": cpus_available(), "demo_ratio_busy_to_alone": round(ratio, 2), "rows": rows,
              "provenance": provenance()}
    save_json(result, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
