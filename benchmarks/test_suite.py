"""How long the test suites take: runs `make test`, `make test-long` and `make test-docs` one after another (each
alone on the machine) and writes their test counts and wall times, with the commit, to
benchmarks/results/test_suite.json (the README's figures come from it: benchmarks/docs_blocks.py).

    python benchmarks/test_suite.py [--targets test,test-long,test-docs] [--out benchmarks/results/test_suite.json]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

from rmt_fairseq.provenance import provenance

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="test,test-long,test-docs", help="make targets, in order")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "test_suite.json"))
    a = ap.parse_args(argv)
    rows = []
    for target in a.targets.split(","):
        t0 = time.perf_counter()
        p = subprocess.run(["make", "-C", REPO, target], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        tail = (p.stdout + p.stderr).strip().splitlines()[-1] if (p.stdout + p.stderr).strip() else ""
        counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail)}
        row = {"command": f"make {target}", "returncode": p.returncode, "passed": counts.get("passed", 0),
               "tests": sum(v for k, v in counts.items() if k != "deselected"), "summary": tail,
               "wall_seconds": round(wall, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"rows": rows, "provenance": provenance()}, f, indent=2)
    print(f"wrote {a.out}")
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
