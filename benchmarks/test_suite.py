"""How long the test suites take: runs `make test`, `make test-long` and `make test-docs` one after another (each
alone on the machine) and writes their test counts and wall times, with the commit, to
benchmarks/results/test_suite.json (each target's output: outputs/test_suite/TARGET.log; the README's figures
come from the JSON: benchmarks/docs_blocks.py).

    python benchmarks/test_suite.py [--targets test,test-long,test-docs] [--out benchmarks/results/test_suite.json]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

from rmt_fairseq.provenance import provenance, write_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_summary(out: str) -> str:
    """pytest's last summary line ("490 passed, 3 deselected in 1800.00s"), wherever make's lines put it; else the
    output's last line."""
    summaries = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed|errors?)\b.* in \d", line)]
    return summaries[-1].strip("= ") if summaries else (out.strip().splitlines() or [""])[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="test,test-long,test-docs", help="make targets, in order")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "test_suite.json"))
    a = ap.parse_args(argv)
    rows = []
    for target in a.targets.split(","):
        t0 = time.perf_counter()
        p = subprocess.run(["make", "--no-print-directory", "-C", REPO, target], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        out = p.stdout + p.stderr
        os.makedirs(os.path.join(REPO, "outputs", "test_suite"), exist_ok=True)
        with open(os.path.join(REPO, "outputs", "test_suite", f"{target}.log"), "w") as f:
            f.write(out)
        tail = pytest_summary(out)
        counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail)}
        row = {"command": f"make {target}", "returncode": p.returncode, "passed": counts.get("passed", 0),
               "tests": sum(v for k, v in counts.items() if k != "deselected"), "summary": tail,
               "wall_seconds": round(wall, 1), "commit": provenance()["commit"],
               "uncommitted_changes": provenance()["uncommitted_changes"],
               "slowest": re.findall(r"^\s*([0-9.]+)s (?:call|setup|teardown)\s+(\S+)", out, re.M)[:5]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    kept, earlier = {}, []
    if os.path.exists(a.out):  # benchmarks/mutations.py's record of the faults the suite catches stays, and so do
        with open(a.out) as f:  # the rows of targets not run this time (each row names its commit)
            old = json.load(f)
        kept = {k: v for k, v in old.items() if k == "mutations"}
        rerun = {x["command"] for x in rows}
        earlier = [r for r in old.get("rows", []) if r.get("commit") and r["command"] not in rerun]
    order = ["make test", "make test-long", "make test-docs"]
    rows = sorted(earlier + rows, key=lambda r: order.index(r["command"]) if r["command"] in order else 9)
    write_results(a.out, {"rows": rows, **kept})
    print(f"wrote {a.out}")
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
