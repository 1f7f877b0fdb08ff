"""Memorization in noise and extrapolation to 1M tokens (issue 7; "Scaling Transformer to 1M tokens", §3-4),
RMT against ARMT (issue 17; Rodkin et al. 2024).

    python benchmarks/memorization.py [--task fact_memorization] [--noise-file TEXT] [--quick] \\
        [--models rmt,armt,no_memory] [--out results.json] [--png extrapolation.png] [--workdir DIR]

Everything through the real CLIs: `rmt-data memorization` (noise: the tinyshakespeare text beside the checkout
by default, generated noise if it is missing or with --noise-file ''), then fairseq-train of rmt_encoder_tiny
with the segment curriculum (1 segment, one more each time validation accuracy reaches --threshold, up to
--max-segments N) for each model: rmt (4 memory tokens), armt (the same 4 memory tokens writing a per-layer
associative memory, d_mem 16: armt_encoder_tiny's settings) and no_memory (the baseline). Then
rmt-extrapolate-classify of rmt and armt (ARMT with --inference-schedule diagonal) on the test stream at
N, 2N, 8N, ... segments up to --max-tokens (1,000,000), streamed with constant memory, both at the same lengths;
the baseline only at the longest length its curriculum reached. Same data, flags, updates, learning rate and seed
for every model. A training run that stops is recorded (training_stopped: the error line and its last
validation) and the others go on. (The recipe that holds to 1M tokens, --curriculum-mix and --memory-layout
gated_hard, is measured by memorization_ablation.py.)
Prints a table and writes JSON (+ a plot with --png). --quick: generated noise, a few updates, 2,000 tokens
(the CI smoke test; its numbers mean nothing).
"""

import argparse
import json
import os
import re
import shutil

from common import run  # a CLI run with its log kept; exits naming the log on failure

from rmt_fairseq.cli import console_script  # noqa: E402
from rmt_fairseq.provenance import provenance  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> flags added to the shared fairseq-train command (rmt_encoder_tiny: 2 layers, C 64; --lr 1e-3); flags
# given here come later on the command line, so they override the shared ones. Every model trains at the same
# learning rate: ARMT once needed half of it (at 1e-3 its first full run stopped with NaN gradients, a read divided
# by the epsilon alone where z . phi(q) = 0); the floored denominator (modules/associative.py DEN_FLOOR) trains at
# 1e-3 (issue 29; memorization_ablation.py's armt row). Results measured before keep their own flags in their JSON.
MODELS = {"rmt": ["--mem-tokens", "4"],
          "armt": ["--mem-tokens", "4", "--associative-memory", "--d-mem", "16", "--dpfp-nu", "3",
                   "--inference-schedule", "diagonal"],
          "no_memory": ["--mem-tokens", "0"]}

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


def plot(ex: dict, task: str, T: int, chance: float):
    """Accuracy (left, with the chance level) and time per token (right) against input tokens, one line per
    extrapolated model; returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, rows in ex.items():
        if name == "no_memory":
            continue
        x = [r["tokens"] for r in rows]
        ax[0].plot(x, [r["accuracy"] for r in rows], "o-", label=name)
        ax[1].plot(x, [r["us_per_token"] for r in rows], "o-", label=name)
    ax[0].axhline(chance, ls="--", c="gray", label=f"chance ({chance:.0f}%)")
    ax[0].set(xscale="log", xlabel="input tokens", ylabel="accuracy (%)", ylim=(0, 105), title=f"{task}, T = {T}")
    ax[1].set(xscale="log", xlabel="input tokens", ylabel="us / token", ylim=(0, None), title="streaming cost")
    for a in ax:
        a.legend(fontsize=8)
    fig.tight_layout()
    return fig


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
    ap.add_argument("--models", default="rmt,armt,no_memory", help="comma-separated subset of "
                    + ",".join(MODELS) + " (rmt or armt is needed: the extrapolation)")
    # the last checkpoint is evaluated: "best" by validation accuracy would pick an early, shorter stage
    ap.add_argument("--out", default="benchmarks/results/memorization.json")
    ap.add_argument("--png", default=None)
    ap.add_argument("--workdir", default="/tmp/rmt_memorization", help="data, checkpoints, logs (recreated)")
    a = ap.parse_args(argv)
    models = a.models.split(",")
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"error: --models: unknown model {m!r} (known: {', '.join(MODELS)})")
    if not {"rmt", "armt"} & set(models):
        raise SystemExit(f"error: --models {a.models}: needs rmt or armt (the models that are extrapolated)")
    T = a.segment_len or (16 if a.quick else 32)
    N = a.max_segments or (2 if a.quick else 5)
    max_update = a.max_update or (40 if a.quick else 3000)
    max_tokens = a.max_tokens or (2000 if a.quick else 1_000_000)
    num_docs = a.num_docs or (16 if a.quick else 64)
    noise = a.noise_file if a.noise_file is not None else ("" if a.quick or not os.path.isfile(SHAKESPEARE)
                                                          else SHAKESPEARE)
    bindir = os.path.dirname(console_script("fairseq-train"))
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
    runs, failed = {}, {}
    for name in models:
        save = os.path.join(a.workdir, f"ckpt_{name}")
        log_path = os.path.join(a.workdir, f"train_{name}.log")
        try:
            log, secs = run([os.path.join(bindir, "fairseq-train")] + common + MODELS[name] + ["--save-dir", save],
                            log_path)
        except SystemExit as e:  # a run that stops (e.g. non-finite gradients) is a result: record it, go on
            with open(log_path) as f:
                log = f.read()
            upd, acc, stages = last_valid(log)
            reason = [ln for ln in log.splitlines() if "Error" in ln and not ln.startswith(" ")]
            failed[name] = {"flags": MODELS[name], "error": str(e), "last_error_line": reason[-1] if reason else None,
                            "last_valid_update": upd, "last_valid_accuracy": acc,
                            "curriculum_stage_reached": 1 + len(stages)}
            print(f"{name}: training stopped: {failed[name]['last_error_line']} (last validation at update {upd}: "
                  f"{acc}%)", flush=True)
            continue
        upd, acc, stages = last_valid(log)
        runs[name] = {"flags": MODELS[name], "train_seconds": round(secs, 1), "updates": upd,
                      "final_valid_accuracy": acc, "curriculum_stage_reached": 1 + len(stages),
                      "checkpoint": os.path.join(save, "checkpoint_last.pt")}
        print(f"{name}: {secs:.0f} s, {upd} updates, curriculum reached {1 + len(stages)} of {N} segments, final "
              f"validation accuracy {acc}", flush=True)

    # the memory models at the same lengths (from the last curriculum stage N); the baseline at its own last stage
    from rmt_fairseq.cli.extrapolate_classification import default_lengths

    lengths = ",".join(str(n) for n in default_lengths(N, T, max_tokens))
    ex, chance = {}, None
    for name in runs:
        segments = lengths if name != "no_memory" else str(runs[name]["curriculum_stage_reached"])
        out = os.path.join(a.workdir, f"extrapolate_{name}")
        run([os.path.join(bindir, "rmt-extrapolate-classify"), "--path", runs[name]["checkpoint"], "--data", data,
             "--out", out, "--num-docs", str(num_docs), "--segments", segments],
            os.path.join(a.workdir, f"extrapolate_{name}.log"))
        with open(os.path.join(out, "extrapolation.json")) as f:
            report = json.load(f)
        ex[name], chance = report["rows"], report["chance"]
    if "armt" in runs:  # the same ARMT checkpoint in the sequential schedule, on the shorter lengths (time)
        short = ",".join(lengths.split(",")[: max(1, len(lengths.split(",")) - 2)])
        out = os.path.join(a.workdir, "extrapolate_armt_sequential")
        run([os.path.join(bindir, "rmt-extrapolate-classify"), "--path", runs["armt"]["checkpoint"], "--data", data,
             "--out", out, "--num-docs", str(num_docs), "--segments", short, "--inference-schedule", "sequential"],
            os.path.join(a.workdir, "extrapolate_armt_sequential.log"))
        with open(os.path.join(out, "extrapolation.json")) as f:
            armt_sequential = json.load(f)["rows"]
    if a.png:
        plot(ex, a.task, T, chance).savefig(a.png, dpi=110)

    result = {
        "setup": {"task": a.task, "noise": os.path.basename(noise) if noise else "generated", "segment_len": T,
                  "max_segments": N, "threshold": a.threshold, "max_update": max_update, "model": "rmt_encoder_tiny",
                  "mem_tokens": 4, "num_docs": num_docs, "seed": a.seed, "quick": a.quick, "models": models},
        "training": runs,
        "training_stopped": failed,
        # "extrapolation" is RMT's (the key earlier results use); other models' rows under "<name>_extrapolation"
        **{("extrapolation" if name == "rmt" else f"{name}_extrapolation"): ex[name]
           for name in runs if name != "no_memory"},
    }
    if "no_memory" in ex:
        result["no_memory_baseline"] = ex["no_memory"]
    if "armt" in runs:
        result["armt_sequential_extrapolation"] = armt_sequential
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({**result, "provenance": provenance()}, f, indent=1)
    print(f"\n{a.task}, noise {result['setup']['noise']}, T={T}, trained up to "
          + ", ".join(f"{runs[m]['curriculum_stage_reached']} segments ({m})" for m in runs))
    print(f"{'model':>10} {'segments':>9} {'tokens':>10} {'accuracy':>9} {'us/token':>9} {'RSS MB':>7}")
    for name in runs:
        for r in ex[name]:
            print(f"{name:>10} {r['segments']:>9} {r['tokens']:>10} {r['accuracy']:>8.2f}% {r['us_per_token']:>9.2f} "
                  f"{r['rss_mb']:>7.0f}")
    for r in result.get("armt_sequential_extrapolation", []):
        print(f"{'armt seq':>10} {r['segments']:>9} {r['tokens']:>10} {r['accuracy']:>8.2f}% {r['us_per_token']:>9.2f} "
              f"{r['rss_mb']:>7.0f}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
