"""What each data-parallel combination costs, measured side by side on this machine (README "Many GPUs").

    python benchmarks/scaleout.py [--quick] [--out benchmarks/results/scaleout.json]

The same model, data and global batch (8 streams) trained for the same updates by: one fairseq-train process,
2 ranks of fairseq-train with --ddp-backend pytorch_ddp and legacy_ddp, 2 ranks of rmt-deepspeed-train under
ZeRO-1, -2 and -3 (every weight partitioned), and bf16 (fairseq-train --bf16, DeepSpeed ZeRO-2 + bf16.json).
For each: training tokens per second over the whole job (the median of the logged wps after warm-up), the
ratio to the one process, startup-to-exit wall time, and the peak resident memory of the largest process.

On a machine with fewer cores than ranks x threads the ranks compete for the same cores: the ratios then show
the overhead of each backend (collectives, partitioning, bucketing), not a speed-up. On GPUs each rank has its
own device; run it there for speed-ups.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from rmt_fairseq.provenance import write_results  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BIN = os.path.dirname(sys.executable)


def _peak_rss(proc, out):
    """Poll the process tree of proc every 0.2 s; out["peak_mb"]: the largest single process's RSS seen."""
    import psutil

    peak = 0
    try:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            for p in [root, *root.children(recursive=True)]:
                try:
                    peak = max(peak, p.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.2)
    except psutil.Error:
        pass
    out["peak_mb"] = peak / 2**20


def run(cmd, log_path):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mem = {}
    watcher = threading.Thread(target=_peak_rss, args=(proc, mem))
    watcher.start()
    out = proc.communicate()[0]
    watcher.join()
    with open(log_path, "w") as f:
        f.write(out)
    if proc.returncode != 0:
        sys.stderr.write(out[-4000:])
        raise SystemExit(f"error: {' '.join(cmd[:3])} failed with exit status {proc.returncode}; log: {log_path}")
    return out, time.perf_counter() - t0, mem.get("peak_mb", 0.0)


def wps(log):
    import re

    values = [float(v) for v in re.findall(r"train_inner .*?wps[=\s]([0-9.]+)", log)]
    return statistics.median(values[1:] if len(values) > 1 else values) if values else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 combinations, few updates (CI smoke test)")
    ap.add_argument("--out", default="benchmarks/results/scaleout.json")
    a = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="scaleout")
    sys.path[:0] = [REPO, os.path.join(REPO, "tests")]
    from helpers import make_recall_data

    data = make_recall_data(work, gap=7, train_docs=400 if a.quick else 3000, valid_docs=40)
    updates, log_every = (6, 2) if a.quick else (60, 10)
    size = ([] if a.quick else ["--decoder-layers", 4, "--decoder-embed-dim", 256, "--decoder-attention-heads", 4,
                                "--decoder-ffn-embed-dim", 1024])
    T = 8 if a.quick else 32
    common = [data, "--user-dir", "user_dir", "--task", "rmt_lm", "--arch", "rmt_tiny", *size, "--criterion",
              "rmt_cross_entropy", "--tokens-per-sample", T, "--bptt-unroll", 1, "--optimizer", "adam", "--lr",
              "1e-3", "--cpu", "--seed", 1, "--log-format", "simple", "--log-interval", log_every, "--num-workers", 0,
              "--no-save", "--disable-validation", "--max-update", updates]
    fs = [os.path.join(BIN, "fairseq-train"), *map(str, common)]
    zero3 = os.path.join(work, "zero3_partition_all.json")
    with open(zero3, "w") as f:
        json.dump({"zero_optimization": {"stage3_param_persistence_threshold": 0}}, f)

    def ds(config, port):
        return [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
                os.path.join(BIN, "rmt-deepspeed-train"), *map(str, common), "--batch-size", "4",
                "--deepspeed-config", config]

    combos = {
        "fairseq-train, 1 process": fs + ["--batch-size", "8"],
        "fairseq-train, 2 ranks, pytorch_ddp": fs + ["--batch-size", "4", "--distributed-world-size", "2"],
        "fairseq-train, 2 ranks, legacy_ddp": fs + ["--batch-size", "4", "--distributed-world-size", "2",
                                                    "--ddp-backend", "legacy_ddp"],
        "DeepSpeed ZeRO-1, 2 ranks": ds("ds_configs/zero1.json", 29801),
        "DeepSpeed ZeRO-2, 2 ranks": ds("ds_configs/zero2.json", 29802),
        "DeepSpeed ZeRO-3 (all partitioned), 2 ranks": ds(f"ds_configs/zero3.json,{zero3}", 29803),
        "fairseq-train --bf16, 1 process": fs + ["--batch-size", "8", "--bf16"],
        "DeepSpeed ZeRO-2 + bf16, 2 ranks": ds("ds_configs/zero2.json,ds_configs/bf16.json", 29804),
    }
    if a.quick:
        combos = {k: v for k, v in list(combos.items())[:2]}
    rows = []
    for name, cmd in combos.items():
        log, seconds, peak = run(cmd, os.path.join(work, f"{len(rows)}.log"))
        rows.append({"combination": name, "tokens_per_s": wps(log), "wall_s": round(seconds, 1),
                     "peak_rss_mb_largest_process": round(peak, 1)})
        print(f"[scaleout] {name}: {rows[-1]['tokens_per_s']:.0f} tokens/s, {seconds:.1f} s, {peak:.0f} MB",
              flush=True)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["ratio_to_one_process"] = round(r["tokens_per_s"] / base, 3) if base else None
    result = {"setting": {"updates": updates, "global_streams": 8, "segment": T, "model": "rmt_tiny" + (
        " 4 x 256, FFN 1024" if size else ""), "threads_per_process": 1, "cpu_cores": os.cpu_count()},
        "rows": rows}
    print(f"\n{'combination':<46} {'tokens/s':>9} {'x 1 proc':>8} {'wall s':>7} {'peak MB':>8}")
    for r in rows:
        print(f"{r['combination']:<46} {r['tokens_per_s']:>9.0f} {r['ratio_to_one_process']:>8.3f} {r['wall_s']:>7.1f} "
              f"{r['peak_rss_mb_largest_process']:>8.0f}")
    write_results(a.out, result)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
