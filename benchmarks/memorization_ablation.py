"""What makes memory hold beyond its trained length (issue 29): one recipe at a time against memorization.py's
RMT baseline, each scored at the trained length N, at 2N, 8N, 32N segments and at 1,000,000 tokens.

    python benchmarks/memorization_ablation.py --recipes rmt,rmt_gated [--task fact_memorization] [--seeds 1,2] \\
        [--subset valid|test|valid,test] [--out benchmarks/results/memorization_ablation.json] [--png PNG] \\
        [--workdir DIR] [--max-tokens 1000000]

Every recipe is memorization.py's run (rmt-data memorization on the tinyshakespeare noise, fairseq-train of
rmt_encoder_tiny with the segment curriculum 1 -> N, T = 32, 3000 updates, batch 32, lr 1e-3 unless the recipe
says otherwise) plus the recipe's flags, then rmt-extrapolate-classify of checkpoint_last.pt on 64 documents per
length of each split in --subset (valid by default: recipes are chosen on validation; the headline rows are
scored on test, two seeds). Rows accumulate in --out, one per (task, recipe, seed, subset), each with its own
command, commit and machine; a recipe whose training stops is a row too (its error line). --render re-draws the
PNG from --out without training.
"""

import argparse
import json
import math
import os
import shutil
import sys

from common import run
from memorization import SHAKESPEARE, last_valid

from rmt_fairseq.cli import console_script
from rmt_fairseq.provenance import provenance

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RMT = ["--mem-tokens", "4"]
ARMT = ["--mem-tokens", "4", "--associative-memory", "--d-mem", "16", "--dpfp-nu", "3", "--inference-schedule",
        "diagonal"]
# name -> (what it changes against its base, flags after the shared ones; later flags override earlier ones)
RECIPES = {
    "rmt": ("baseline: RMT, 4 memory tokens (memorization.py's)", RMT),
    "rmt_gated": ("gated write (--memory-layout gated)", RMT + ["--memory-layout", "gated"]),
    "rmt_gated_hard": ("hard gated write (--memory-layout gated_hard)", RMT + ["--memory-layout", "gated_hard"]),
    "rmt_gated_hard_mix": ("hard gated write + --curriculum-mix",
                           RMT + ["--memory-layout", "gated_hard", "--curriculum-mix"]),
    "rmt_mix": ("lengths 1..stage per document (--curriculum-mix)", RMT + ["--curriculum-mix"]),
    "rmt_mix_8seg": ("--curriculum-mix, curriculum to 8 segments, 6000 updates",
                    RMT + ["--curriculum-mix", "--max-num-segments", "8", "--max-update", "6000"]),
    "rmt_mem16": ("16 memory tokens", ["--mem-tokens", "16"]),
    "rmt_8seg": ("curriculum to 8 segments, 6000 updates", RMT + ["--max-num-segments", "8", "--max-update", "6000"]),
    "rmt_gated_mix": ("gated write + --curriculum-mix", RMT + ["--memory-layout", "gated", "--curriculum-mix"]),
    "armt_lr5e-4": ("ARMT, lr 5e-4 (memorization.py's)", ARMT + ["--lr", "5e-4"]),
    "armt": ("ARMT at the shared lr 1e-3 (denominator floored)", ARMT),
    "armt_parallel": ("ARMT at lr 1e-3, the authors' parallel write (--associative-write parallel)",
                      ARMT + ["--associative-write", "parallel"]),
    "armt_mix": ("ARMT + --curriculum-mix", ARMT + ["--curriculum-mix"]),
    "armt_gated_mix": ("ARMT with a gated token memory + --curriculum-mix",
                       ARMT + ["--memory-layout", "gated", "--curriculum-mix"]),
}
WIDE = ["--encoder-layers", "4", "--encoder-embed-dim", "128", "--encoder-ffn-embed-dim", "256",
        "--encoder-attention-heads", "4"]
RECIPES.update({
    "rmt_wide": ("4 layers, C 128 (rmt_encoder_tiny's 2 x 64 widened)", RMT + WIDE),
    "rmt_wide_lr5e-4": ("4 layers, C 128, lr 5e-4", RMT + WIDE + ["--lr", "5e-4"]),
    "rmt_wide_mix": ("4 layers, C 128, --curriculum-mix", RMT + WIDE + ["--curriculum-mix"]),
})
# recipes that change the training data rather than the flags: rmt-data's --train-size (documents are generated on the
# fly, so 4M costs nothing to write; a 3000-update run draws 96,000 of them, none twice, where the 20,000 default
# repeats each about five times)
FRESH = 4_000_000
# recipes on generated noise words (n0..n999: no template word can occur in the noise) instead of tinyshakespeare's
GENERATED_NOISE = {"rmt_fresh_gen_noise"}
TRAIN_SIZE = {name: FRESH for name in ("rmt_fresh_gen_noise", "rmt_fresh", "rmt_gated_hard_mix_fresh", "rmt_wide_fresh",
                                        "rmt_preln_fresh", "rmt_lr3e-4_fresh",
                                        "rmt_gated_hard_mix_8seg_fresh")}
RECIPES.update({
    "rmt_fresh": ("fresh documents: 4M generated on the fly, none drawn twice", RMT),
    "rmt_gated_hard_mix_fresh": ("hard gated write + --curriculum-mix + fresh documents",
                                 RMT + ["--memory-layout", "gated_hard", "--curriculum-mix"]),
    "rmt_wide_fresh": ("4 layers, C 128 + fresh documents", RMT + WIDE),
    "rmt_fresh_gen_noise": ("fresh documents in generated noise words (no template word in the noise)", RMT),
    "rmt_preln_fresh": ("pre-norm layers (--encoder-normalize-before) + fresh documents",
                        RMT + ["--encoder-normalize-before"]),
    "rmt_lr3e-4_fresh": ("lr 3e-4 with 500 warmup updates + fresh documents",
                         RMT + ["--lr", "3e-4", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "500"]),
    "rmt_gated_hard_mix_bias-2": ("hard gated write + --curriculum-mix, the gate starting to keep memory "
                                  "(--memory-gate-bias -2: writes 1/6)",
                                  RMT + ["--memory-layout", "gated_hard", "--curriculum-mix",
                                         "--memory-gate-bias", "-2"]),
    "rmt_gated_hard_mix_readgate": ("hard gated write + --curriculum-mix, the gate seeing the memory read alone "
                                    "(--memory-gate-input read)",
                                    RMT + ["--memory-layout", "gated_hard", "--curriculum-mix",
                                           "--memory-gate-input", "read"]),
    "rmt_gated_hard_mix_readgate_bias-2": ("hard gated write + --curriculum-mix, the gate on the memory read alone "
                                           "and starting to keep it (--memory-gate-input read --memory-gate-bias -2)",
                                           RMT + ["--memory-layout", "gated_hard", "--curriculum-mix",
                                                  "--memory-gate-input", "read", "--memory-gate-bias", "-2"]),
    "rmt_gated_hard_mix_8seg": ("hard gated write + --curriculum-mix, curriculum to 8 segments",
                                RMT + ["--memory-layout", "gated_hard", "--curriculum-mix", "--max-num-segments", "8"]),
    "rmt_gated_hard_mix_8seg_fresh": ("hard gated write + --curriculum-mix, curriculum to 8 segments, fresh documents",
                                      RMT + ["--memory-layout", "gated_hard", "--curriculum-mix",
                                             "--max-num-segments", "8"]),
})
MAX_TOKENS = 1_000_000


def lengths_of(N: int, T: int, max_tokens: int = MAX_TOKENS):
    """N, 2N, 8N, 32N segments and the first length reaching max_tokens (1M)."""
    return [N, 2 * N, 8 * N, 32 * N, math.ceil(max_tokens / T)]


def train_and_score(name, a, data, bindir, T, N, seed):
    """Train recipe `name` with `seed`, score the checkpoint on each of --subset's splits -> one row per split."""
    flags = RECIPES[name][1]
    n_max = int(flags[flags.index("--max-num-segments") + 1]) if "--max-num-segments" in flags else N
    work = os.path.join(a.workdir, f"{a.task}_{name}_s{seed}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    cmd = [os.path.join(bindir, "fairseq-train"), data, "--user-dir", os.path.join(REPO, "user_dir"),
           "--task", "rmt_long_classification", "--arch", "rmt_encoder_tiny", "--criterion", "rmt_classification",
           "--tokens-per-sample", str(T), "--num-segments", "1", "--segment-curriculum", "--max-num-segments", str(N),
           "--curriculum-threshold", "95", "--batch-size", "32", "--optimizer", "adam", "--lr", "1e-3",
           "--clip-norm", "1.0", "--max-update", str(a.max_update), "--max-epoch", "1000",
           "--validate-interval-updates", "100", "--validate-interval", "1000", "--no-epoch-checkpoints",
           "--no-save-optimizer-state", "--seed", str(seed), "--num-workers", "0", "--log-format", "json",
           "--log-interval", "50", "--cpu", "--save-dir", os.path.join(work, "ckpt")] + flags
    row = {"task": a.task, "recipe": name, "change": RECIPES[name][0], "flags": flags, "seed": seed,
           "num_docs": a.num_docs, "max_segments": N}
    try:
        log, secs = run(cmd, os.path.join(work, "train.log"))
    except SystemExit as e:
        with open(os.path.join(work, "train.log")) as f:
            log = f.read()
        upd, acc, stages = last_valid(log)
        err = [ln for ln in log.splitlines() if "Error" in ln and not ln.startswith(" ")]
        row.update(training_stopped=str(e), last_error_line=err[-1] if err else None, last_valid_update=upd,
                   last_valid_accuracy=acc, curriculum_stage_reached=1 + len(stages))
        return [dict(row, subset=subset) for subset in a.subset.split(",")]
    upd, acc, stages = last_valid(log)
    row.update(train_seconds=round(secs, 1), updates=upd, final_valid_accuracy=acc,
               curriculum_stage_reached=1 + len(stages), trained_to=n_max)
    row["gate_closed_share"] = gate_closed_share(os.path.join(work, "ckpt", "checkpoint_last.pt"), data, a.num_docs)
    rows = []
    for subset in a.subset.split(","):
        out = os.path.join(work, f"extrapolate_{subset}")
        run([os.path.join(bindir, "rmt-extrapolate-classify"), "--path",
             os.path.join(work, "ckpt", "checkpoint_last.pt"), "--data", data, "--out", out, "--num-docs",
             str(a.num_docs), "--subset", subset,
             "--segments", ",".join(str(n) for n in lengths_of(1 + len(stages), T, a.max_tokens))],
            os.path.join(work, f"extrapolate_{subset}.log"))
        with open(os.path.join(out, "extrapolation.json")) as f:
            rep = json.load(f)
        rows.append(dict(row, subset=subset, chance=rep["chance"],
                         rows=[{k: r[k] for k in ("segments", "tokens", "accuracy", "us_per_token")}
                               for r in rep["rows"]]))
    return rows


GATE_SEGMENTS = 160  # the gate is measured over segments 2 .. GATE_SEGMENTS of each document


def gate_closed_share(ckpt: str, data: str, num_docs: int = 64, segments: int = GATE_SEGMENTS):
    """Share of the hard update gate's channels (slots x C) exactly closed, pre-activation <= -3 (hardsigmoid 0: the
    channel keeps its memory bit for bit), over segments 2..`segments` of the first num_docs validation documents
    (segment 1 writes the fact), through the model's forward with a hook on its `memory_gate`; None for a checkpoint
    without --memory-layout gated_hard. A leak of a few percent per segment is harmless over the trained length and
    not over 31,250 segments: this says which channels cannot leak."""
    import torch
    from fairseq import checkpoint_utils, utils

    from rmt_fairseq.cli.extrapolate_classification import evaluate_length

    utils.import_user_module(argparse.Namespace(user_dir=os.path.join(REPO, "user_dir")))
    state = checkpoint_utils.load_checkpoint_to_cpu(ckpt, {"data": data})
    if str(state["cfg"]["model"].get("memory_layout")) != "gated_hard":
        return None
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([ckpt], {"data": data}, state=state)
    model = models[0].eval()
    task.load_dataset("valid")
    closed = []
    hook = model.encoder.memory_gate.register_forward_hook(lambda m, i, out: closed.append((out <= -3).float().mean()))
    # the documents streamed as rmt-extrapolate-classify streams them: one batch, one chunk, one carry per segment
    evaluate_length(task, model, segments, num_docs, batch_size=num_docs, chunk=segments, subset="valid")
    hook.remove()
    return round(float(torch.stack(closed[1:]).mean()), 4)  # the carries after segments 2..segments


def plot(rows, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in rows:
            if r["task"] != task or "rows" not in r:
                continue
            x = [e["segments"] / r["curriculum_stage_reached"] for e in r["rows"]]
            ax.plot(x, [e["accuracy"] for e in r["rows"]], "o-", label=f"{r['recipe']} s{r['seed']} ({r['subset']})")
        ax.axhline(100 / 6, ls="--", c="gray", label="chance")
        ax.set(xscale="log", xlabel="length / trained length", ylabel="accuracy (%)", ylim=(0, 105), title=task)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def prepare(a, bindir, train_size: int, shakespeare: bool = True) -> str:
    """rmt-data memorization of --task with `train_size` training documents (valid 256, test 64), in the
    tinyshakespeare noise or (shakespeare False) generated noise words, made once per variant under --workdir -> its
    directory. Valid and test documents are the same for every size (a document is a function of its split, index
    and seed)."""
    data = os.path.join(a.workdir, f"data_{a.task}" + ("" if train_size == 20000 else f"_n{train_size}")
                        + ("" if shakespeare else "_gen"))
    if not os.path.isfile(os.path.join(data, "generator.json")):
        os.makedirs(a.workdir, exist_ok=True)
        run([os.path.join(bindir, "rmt-data"), "memorization", a.task, "--out", data, "--train-size",
             str(train_size), "--valid-size", "256", "--test-size", "64"]
            + (["--noise-file", SHAKESPEARE] if shakespeare else []), data + ".log")
    return data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="rmt", help="comma-separated, from: " + ", ".join(RECIPES))
    ap.add_argument("--task", default="fact_memorization", choices=["fact_memorization", "fact_detection",
                                                                      "reasoning"])
    ap.add_argument("--seeds", default="1", help="comma-separated: one training per seed")
    ap.add_argument("--subset", default="valid", help="valid, test or valid,test: the split(s) each checkpoint is "
                    "scored on")
    ap.add_argument("--max-segments", type=int, default=5, help="the curriculum's last stage N (a recipe may raise it)")
    ap.add_argument("--max-update", type=int, default=3000)
    ap.add_argument("--num-docs", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="the longest length scored, in tokens")
    ap.add_argument("--out", default="benchmarks/results/memorization_ablation.json")
    ap.add_argument("--png", default="benchmarks/results/memorization_ablation.png")
    ap.add_argument("--workdir", default="/tmp/rmt_ablation")
    ap.add_argument("--render", action="store_true", help="only re-draw --png from --out")
    ap.add_argument("--measure-gates", default=None, metavar="DIRS",
                    help="only add gate_closed_share to the rows of --out whose checkpoint is under one of these "
                         "comma-separated earlier --workdir directories (gated_hard recipes trained before it existed)")
    a = ap.parse_args(argv)
    results = {"rows": []}
    if os.path.isfile(a.out):
        with open(a.out) as f:
            results = json.load(f)
    if a.render:
        plot(results["rows"], a.png)
        return
    if a.measure_gates:
        for r in results["rows"]:
            if "gated_hard" not in r["flags"] or "gate_closed_share" in r:
                continue
            for d in a.measure_gates.split(","):
                ckpt = os.path.join(d, f"{r['task']}_{r['recipe']}_s{r['seed']}", "ckpt", "checkpoint_last.pt")
                data = os.path.join(d, f"data_{r['task']}" + (f"_n{r['train_size']}" if r.get("train_size", 20000)
                                                               != 20000 else ""))
                if os.path.isfile(ckpt) and os.path.isdir(data):
                    r["gate_closed_share"] = gate_closed_share(ckpt, data)
                    print(f"{r['task']} {r['recipe']} seed {r['seed']}: closed gate share {r['gate_closed_share']}")
                    break
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
        return
    names = a.recipes.split(",")
    for n in names:
        if n not in RECIPES:
            sys.exit(f"error: --recipes: unknown recipe {n!r} (known: {', '.join(RECIPES)})")
    T, N = 32, a.max_segments
    bindir = os.path.dirname(console_script("fairseq-train"))
    if set(a.subset.split(",")) - {"valid", "test"}:
        sys.exit(f"error: --subset: valid, test or both, got {a.subset!r}")
    for name, seed in [(n, int(s)) for n in names for s in a.seeds.split(",")]:
        data = prepare(a, bindir, TRAIN_SIZE.get(name, 20000), name not in GENERATED_NOISE)
        for row in train_and_score(name, a, data, bindir, T, N, seed):
            row["train_size"] = TRAIN_SIZE.get(name, 20000)
            row["provenance"] = provenance()
            key = (row["task"], row["recipe"], row["seed"], row["subset"])
            results["rows"] = [r for r in results["rows"]
                               if (r["task"], r["recipe"], r["seed"], r["subset"]) != key] + [row]
            with open(a.out, "w") as f:
                json.dump(results, f, indent=1)
            acc = " / ".join(f"{e['accuracy']:.1f}" for e in row.get("rows", []))
            print(f"{a.task} {name} seed {seed}: stage {row.get('curriculum_stage_reached')}, "
                  f"{row.get('train_seconds', 'stopped')} s; {row['subset']} accuracy at "
                  f"{[e['segments'] for e in row.get('rows', [])]} segments: "
                  f"{acc or row.get('last_error_line')}", flush=True)
    plot(results["rows"], a.png)


if __name__ == "__main__":
    main()
