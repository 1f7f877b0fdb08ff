"""Does `make test` still catch the faults it guards against? Applies each mutation below to the checkout, one at a
time, runs `make test` (stopping at the first failing test, --maxfail=1), records which test failed, and restores
the file (always, also on Ctrl-C). The result goes into benchmarks/results/test_suite.json under "mutations" (the
suite's own figures, written by benchmarks/test_suite.py, are kept). Issue 25: the faster suite must still fail on
each of them, and name the test that caught it.

    python benchmarks/mutations.py [--only NAME,...] [--out benchmarks/results/test_suite.json]
                                   [--pytest-args "..."]   (appended to make test's PYTEST_ARGS; default: the
                                                            unit-test folders first, the same tests)

A mutation that `make test` does not catch is reported (`caught: false`) and makes the script exit 1.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from test_suite import pytest_summary  # noqa: E402  (the script beside this one)

# name -> (what it breaks, file, the exact text it replaces (once), the replacement). Not here: removing the detach at
# the end of run_segments alone (state.memory = memory): the in-loop detach has already detached the memory at the
# block's last segment, so the mutant computes the same thing (measured: `make test` passed everything but a stale
# README block; issue 28 lists the duplicate truncation).
MUTATIONS = {
    "memory_mask_entry": (
        "one entry of the memory attention mask flipped: the first segment token sees the last key (the last "
        "write-memory token, which has read the whole segment)",
        "rmt_fairseq/modules/memory.py",
        "    vis[r_seg, c_seg] = torch.ones(T, T, dtype=torch.bool).tril()  # causal within the segment\n",
        "    vis[r_seg, c_seg] = torch.ones(T, T, dtype=torch.bool).tril()  # causal within the segment\n"
        "    vis[M, K - 1] = ~vis[M, K - 1]  # MUTATION\n"),
    "bptt_detach_in_call": (
        "the carried memory's detach at the BPTT block boundary inside a call removed",
        "rmt_fairseq/modules/recurrence.py",
        "            # block boundary inside a call (samples longer than K+1 segments)\n"
        "            memory, assoc = _detach(memory), _detach(assoc)\n",
        "            # block boundary inside a call (samples longer than K+1 segments)\n"
        "            pass  # MUTATION\n"),
    "rank_allreduce_skipped": (
        "rank 1 keeps its own gradient instead of the all-reduced one (DDP on CPU ranks: it still joins the "
        "collective, so nothing hangs)",
        "rmt_fairseq/distributed.py",
        "            **{sync: args.broadcast_buffers}))\n",
        "            **{sync: args.broadcast_buffers}))\n"
        "        import torch  # MUTATION\n"
        "        if torch.distributed.get_rank(process_group) == 1:  # MUTATION\n"
        "            def _keep_local(state, bucket):  # MUTATION\n"
        "                buf = bucket.buffer()  # MUTATION\n"
        "                work = torch.distributed.all_reduce(buf.clone(), group=process_group, async_op=True)\n"
        "                return work.get_future().then(lambda f: buf)  # MUTATION\n"
        "            wrapped.module.register_comm_hook(None, _keep_local)  # MUTATION\n"),
    "stream_state_not_checkpointed": (
        "the training streams' memory left out of the checkpoint",
        "rmt_fairseq/tasks/rmt_lm.py",
        '        return {self.__class__.__name__: {"train_state": state}}\n',
        '        return {self.__class__.__name__: {"train_state": None}}  # MUTATION\n'),
    "armt_correction_dropped": (
        "ARMT's delta-rule correction term dropped: the write stores v instead of v - vbar (the value already "
        "stored under the key)",
        "rmt_fairseq/modules/associative.py",
        "        delta = v - _bmm(mk, A) / den  # ... x M x C: v_j - vbar_j\n",
        "        delta = v  # MUTATION\n"),
    "diagonal_stale_layer_state": (
        "one layer of the diagonal schedule fed the previous segment's state: layer 0 keeps the associative "
        "state it had before every odd segment",
        "rmt_fairseq/modules/recurrence.py",
        "                if new_a is not None:\n                    assoc[layer] = [new_a[0][g], new_a[1][g]]\n",
        "                if new_a is not None and not (layer == 0 and s % 2 == 1):  # MUTATION\n"
        "                    assoc[layer] = [new_a[0][g], new_a[1][g]]\n"),
}


# make test's own selection (its markers), collected in this order: pytest drops the paths given twice
FAST_FIRST = "tests/modules tests/models tests/criterions tests/tasks tests/data tests"


def run_make_test(extra: str) -> tuple:
    t0 = time.perf_counter()
    p = subprocess.run(["make", "--no-print-directory", "-C", REPO, "test",
                        f"PYTEST_ARGS=--maxfail=1 -p no:cacheprovider {extra}".strip()],
                       capture_output=True, text=True)
    return p, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated names (default: all): " + ", ".join(MUTATIONS))
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "test_suite.json"))
    ap.add_argument("--pytest-args", default=FAST_FIRST,
                    help="appended to make test's PYTEST_ARGS (default: the same tests, the unit-test folders "
                         "first, so that a fault they catch ends the run early)")
    a = ap.parse_args(argv)
    names = [n for n in a.only.split(",") if n] or list(MUTATIONS)
    unknown = [n for n in names if n not in MUTATIONS]
    if unknown:
        print(f"error: --only {','.join(unknown)}: no such mutation (have: {', '.join(MUTATIONS)})", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        what, rel, old, new = MUTATIONS[name]
        path = os.path.join(REPO, rel)
        with open(path) as f:
            original = f.read()
        if original.count(old) != 1:
            print(f"error: mutation {name}: the text it replaces occurs {original.count(old)} times in {rel} "
                  f"(the code changed: update MUTATIONS)", file=sys.stderr)
            return 2
        try:
            with open(path, "w") as f:
                f.write(original.replace(old, new))
            p, wall = run_make_test(a.pytest_args)
        finally:
            with open(path, "w") as f:
                f.write(original)
        out = p.stdout + p.stderr
        os.makedirs(os.path.join(REPO, "outputs", "mutations"), exist_ok=True)
        with open(os.path.join(REPO, "outputs", "mutations", f"{name}.log"), "w") as f:
            f.write(out)
        # pytest's short summary: "FAILED tests/x.py::test_y[a param id] - AssertionError: ..."
        failed = [m.group(1) for m in re.finditer(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", out, re.M)]
        row = {"mutation": name, "breaks": what, "file": rel, "make_test_returncode": p.returncode,
               "caught": p.returncode != 0 and bool(failed), "caught_by": failed[:3],
               "summary": pytest_summary(out),
               "wall_seconds": round(wall, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    from rmt_fairseq.provenance import provenance

    results = {}
    if os.path.exists(a.out):
        with open(a.out) as f:
            results = json.load(f)
    previous = {r["mutation"]: r for r in results.get("mutations", {}).get("rows", [])}
    previous.update({r["mutation"]: r for r in rows})
    results["mutations"] = {"rows": [previous[n] for n in MUTATIONS if n in previous], "provenance": provenance(),
                            "pytest_args": f"--maxfail=1 -p no:cacheprovider {a.pytest_args}".strip()}
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {a.out}")
    return 0 if all(r["caught"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
