"""Memorization in noise and extrapolation to 1M tokens (issue 7; "Scaling Transformer to 1M tokens", §3-4).

    python benchmarks/memorization.py [--task fact_memorization] [--noise-file TEXT] [--quick] \\
        [--out results.json] [--png extrapolation.png] [--workdir DIR]

Everything through the real CLIs: `rmt-data memorization` (noise: the tinyshakespeare text beside the checkout
by default, generated noise if it is missing or with --noise-file ''), then fairseq-train of rmt_encoder_tiny
with the segment curriculum (1 segment, one more each time validation accuracy reaches --threshold, up to
--max-segments N), the same run without memory tokens as the baseline, and rmt-extrapolate-classify on the
test stream at N, 2N, 8N, ... segments up to --max-tokens (1,000,000), streamed with constant memory.
Prints a table and writes JSON (+ a plot with --png). --quick: generated noise, a few updates, 2,000 tokens
(the CI smoke test; its numbers mean nothing).
"""

import argparse
import json
import os
import re
import shutil
import sys

from common import run  # a CLI run with its log kept; exits naming the log on failure

from rmt_fairseq.provenance import provenance  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAKESPEARE = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare", "input.txt")


def last_valid(log: str):
    """(num_updates, accuracy, num_segments at the end) from fairseq's json log lines."""
    acc = upd = None
    for line in log.splitlines():
        if "| valid | " in line:
            d = json.loads(line.split("| valid | ", 1)[1])
            acc, upd = float(d["valid_accuracy"]), int(float(d["valid_num_updates"]))
    stages = [int(m) for m in re.findall(r"now (\d+) segments per sample", log)]
    return upd, acc, stages


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="fact_memorization", choices=["fact_memorization", "fact_detection",
                                                                      "reasoning"])
    ap.add_argument("--noise-file", default=None, help="background text (default: tinyshakespeare if present; "
                    "'' for generated noise)")
    ap.add_argument("--quick", action="store_true", help="tiny run for CI: generated noise, few updates")
    ap.add_argument("--segment-len", type=int, default=None, help="T (default 32; quick 16)")
    ap.add_argument("--max-segments", type=int, default=None, help="curriculum's last stage N (default 5)")
    ap.add_argument("--threshold", type=float, default=95.0, help="validation accuracy that adds a segment")
    ap.add_argument("--max-update", type=int, default=None, help="updates (default 3000; quick 40)")
    ap.add_argument("--max-tokens", type=int, default=None, help="longest extrapolation (default 1000000)")
    ap.add_argument("--num-docs", type=int, default=None, help="test documents per length (default 64)")
    ap.add_argument("--seed", type=int, default=1)
    # the last checkpoint is evaluated: "best" by validation accuracy would pick an early, shorter stage
    ap.add_argument("--out", default="benchmarks/results/memorization.json")
    ap.add_argument("--png", default=None)
    ap.add_argument("--workdir", default="/tmp/rmt_memorization", help="data, checkpoints, logs (recreated)")
    a = ap.parse_args(argv)
    T = a.segment_len or (16 if a.quick else 32)
    N = a.max_segments or (2 if a.quick else 5)
    max_update = a.max_update or (40 if a.quick else 3000)
    max_tokens = a.max_tokens or (2000 if a.quick else 1_000_000)
    num_docs = a.num_docs or (16 if a.quick else 64)
    noise = a.noise_file if a.noise_file is not None else ("" if a.quick or not os.path.isfile(SHAKESPEARE)
                                                          else SHAKESPEARE)
    bindir = os.path.dirname(sys.executable)
    shutil.rmtree(a.workdir, ignore_errors=True)
    data = os.path.join(a.workdir, "data")
    os.makedirs(a.workdir)
    run([os.path.join(bindir, "rmt-data"), "memorization", a.task, "--out", data, "--train-size", "20000",
         "--valid-size", "256", "--test-size", str(max(num_docs, 16))] + (["--noise-file", noise] if noise else []),
        os.path.join(a.workdir, "data.log"))

    common = [data, "--user-dir", os.path.join(REPO, "user_dir"), "--task", "rmt_long_classification",
              "--arch", "rmt_encoder_tiny", "--criterion", "rmt_classification", "--tokens-per-sample", str(T),
              "--num-segments", "1", "--segment-curriculum", "--max-num-segments", str(N),
              "--curriculum-threshold", str(a.threshold), "--batch-size", "32", "--optimizer", "adam",
              "--lr", "1e-3", "--clip-norm", "1.0", "--max-update", str(max_update), "--max-epoch", "1000",
              "--validate-interval-updates", str(10 if a.quick else 100), "--validate-interval", "1000",
              "--no-epoch-checkpoints", "--no-save-optimizer-state", "--seed", str(a.seed),
              "--num-workers", "0", "--log-format", "json", "--log-interval", "50", "--cpu"]
    runs = {}
    for name, mem in [("rmt", "4"), ("no_memory", "0")]:
        save = os.path.join(a.workdir, f"ckpt_{name}")
        log, secs = run([os.path.join(bindir, "fairseq-train")] + common + ["--mem-tokens", mem, "--save-dir", save],
                        os.path.join(a.workdir, f"train_{name}.log"))
        upd, acc, stages = last_valid(log)
        runs[name] = {"train_seconds": round(secs, 1), "updates": upd, "final_valid_accuracy": acc,
                      "curriculum_stage_reached": 1 + len(stages),
                      "checkpoint": os.path.join(save, "checkpoint_last.pt")}
        print(f"{name}: {secs:.0f} s, {upd} updates, curriculum reached {1 + len(stages)} of {N} segments, final "
              f"validation accuracy {acc}", flush=True)

    # extrapolation of the RMT model; the no-memory baseline only at the longest length it was trained on
    ex = {}
    for name, extra in [("rmt", ["--max-tokens", str(max_tokens)]),
                        ("no_memory", ["--segments", str(runs["no_memory"]["curriculum_stage_reached"])])]:
        out = os.path.join(a.workdir, f"extrapolate_{name}")
        run([os.path.join(bindir, "rmt-extrapolate-classify"), "--path", runs[name]["checkpoint"], "--data", data,
             "--out", out, "--num-docs", str(num_docs)] + extra, os.path.join(a.workdir, f"extrapolate_{name}.log"))
        with open(os.path.join(out, "extrapolation.json")) as f:
            ex[name] = json.load(f)
        if a.png and name == "rmt":
            shutil.copy(os.path.join(out, "extrapolation.png"), a.png)

    result = {
        "setup": {"task": a.task, "noise": os.path.basename(noise) if noise else "generated", "segment_len": T,
                  "max_segments": N, "threshold": a.threshold, "max_update": max_update, "model": "rmt_encoder_tiny",
                  "mem_tokens": 4, "num_docs": num_docs, "seed": a.seed, "quick": a.quick},
        "training": runs,
        "extrapolation": ex["rmt"]["rows"],
        "no_memory_baseline": ex["no_memory"]["rows"],
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({**result, "provenance": provenance()}, f, indent=1)
    print(f"\n{a.task}, noise {result['setup']['noise']}, T={T}, trained up to "
          f"{runs['rmt']['curriculum_stage_reached']} segments (RMT)")
    print(f"{'model':>10} {'segments':>9} {'tokens':>10} {'accuracy':>9} {'us/token':>9} {'RSS MB':>7}")
    for name, rows in [("rmt", result["extrapolation"]), ("no_memory", result["no_memory_baseline"])]:
        for r in rows:
            print(f"{name:>10} {r['segments']:>9} {r['tokens']:>10} {r['accuracy']:>8.2f}% {r['us_per_token']:>9.2f} "
                  f"{r['rss_mb']:>7.0f}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
