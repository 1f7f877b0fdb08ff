"""Char-level LM quality on tinyshakespeare (issue 5, figure 4): no memory, Transformer-XL, RMT, ARMT.

    python benchmarks/char_lm.py --data ../shared/data/tinyshakespeare/input.txt \\
        [--quick] [--out results.json] [--png curves.png] [--workdir DIR] [--configs none,xl40,...] [--merge]

The corpus is split by characters, in order: train = first 90%, valid = next 5%, test = last 5%. One token per
character (space written as "▁" so fairseq's whitespace tokenizer keeps it; a newline is the line's end of
sentence token), so loss in bits per token is bits per character. Everything goes through the real CLIs:
fairseq-preprocess, then per configuration fairseq-train (same backbone, segment length, updates, data and seed;
validation every --validate-every updates gives the learning curve) and fairseq-eval-lm on the test split as
one stream (memory and cache carried across the whole split). One update = one new segment per stream for every
configuration; RMT with K >= 1 uses --bptt-mode sliding (the paper's / LM-RMT's protocol: each update recomputes
the K segments before it), so all configurations see the same characters in the same order.

Configurations (names for --configs): none (no memory), xl40 (Transformer-XL cache 40), rmt{M}_k{K} for M in
5, 10 and K in 0, 1, 2 (M memory tokens, gradient through memory across K segments), armt{M}_k{K} (the same M
memory tokens writing ARMT's per-layer associative memory, d_mem 64: issue 17; armt5_k1 by default; K = 0 is
refused for ARMT, issue 29), and any memory configuration with _rN appended: the training streams' memory started
afresh every N segments (--memory-reset-interval N; e.g. armt5_k1_r32).
Prints a table, writes JSON; --png draws validation bpc against updates. --merge adds the rows run now to the
--out JSON of an earlier run with the same setup (replacing rows of the same configuration; each row keeps the
provenance of the run that measured it), so one configuration can be added without retraining the others.
"""

import argparse
import json
import os
import re
import shutil
import sys
import time

from common import run  # a CLI run with its log kept; exits naming the log on failure

from rmt_fairseq.cli import console_script  # noqa: E402
from rmt_fairseq.provenance import provenance  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_CONFIGS = ["none", "xl40", "rmt5_k0", "rmt5_k1", "rmt5_k2", "rmt10_k0", "rmt10_k1", "rmt10_k2", "armt5_k1",
               "armt5_k1_r32"]
QUICK_CONFIGS = ["none", "xl40", "rmt5_k1"]


def config_flags(name: str):
    """Model and task flags that distinguish one configuration from another."""
    if name == "none":
        return ["--mem-tokens", "0", "--mem-len", "0", "--bptt-unroll", "0"]
    if name.startswith("xl"):
        return ["--mem-tokens", "0", "--mem-len", name[2:], "--bptt-unroll", "0"]
    m = re.fullmatch(r"(a?)rmt(\d+)_k(\d+)(?:_r(\d+))?", name)
    if not m:
        raise SystemExit(f"error: --configs: unknown configuration {name!r} (known: {', '.join(ALL_CONFIGS)}; "
                         f"_rN after any memory one: --memory-reset-interval N)")
    armt, mem, k, reset = m.groups()
    return ["--mem-tokens", mem] + (["--associative-memory"] if armt else []) + \
        ["--mem-len", "0", "--bptt-unroll", k] + (["--bptt-mode", "sliding"] if k != "0" else []) + \
        (["--memory-reset-interval", reset] if reset else [])


def split_bounds(n: int):
    """(start, end) character offsets of train / valid / test: 90/5/5 in order."""
    return {"train": (0, int(0.9 * n)), "valid": (int(0.9 * n), int(0.95 * n)), "test": (int(0.95 * n), n)}


def write_splits(text: str, out_dir: str):
    """The splits of split_bounds; each character a token, space shown as '▁', newline ends the line."""
    cuts = split_bounds(len(text))
    os.makedirs(out_dir, exist_ok=True)
    for split, (a, b) in cuts.items():
        with open(os.path.join(out_dir, f"{split}.txt"), "w", encoding="utf-8") as f:
            for line in text[a:b].split("\n"):
                f.write(" ".join("▁" if c == " " else c for c in line) + "\n")
    return {k: b - a for k, (a, b) in cuts.items()}


def parse_curves(log: str):
    """(update, bpc) pairs of fairseq's json progress lines: train_inner and valid."""
    train, valid = [], []
    for line in log.splitlines():
        for tag, rows, prefix in (("| train_inner | ", train, ""), ("| valid | ", valid, "valid_")):
            if tag in line:
                d = json.loads(line.split(tag, 1)[1])
                rows.append((int(float(d[prefix + "num_updates"])), float(d[prefix + "loss"])))
    return train, valid


SAME_SETUP = ["characters", "layers", "dim", "heads", "ffn", "segment", "streams", "max_update", "validate_every",
              "seed", "quick", "dropout", "lr"]


def merge(path: str, new_rows: list, setup: dict):
    """The rows of the earlier results at path with new_rows added (a configuration run again replaces its old
    row, in place); -> (rows, the earlier setup with a note of the merge, the earlier provenance).
    Exits with one error line if there is no such file or its setup differs in a field of SAME_SETUP."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --merge: no earlier results at --out {path}")
    with open(path) as f:
        old = json.load(f)
    diff = [k for k in SAME_SETUP if old["setup"].get(k) != setup.get(k)]
    if diff:
        raise SystemExit(f"error: --merge: --out {path} was measured with another setup ({', '.join(diff)}: "
                         + ", ".join(f"{old['setup'].get(k)} vs {setup.get(k)}" for k in diff) + ")")
    by_name = {r["config"]: r for r in new_rows}
    rows = [by_name.pop(r["config"], r) for r in old["rows"]] + list(by_name.values())
    merged = dict(old["setup"])
    merged["note"] = (merged.get("note", "") + f" Merged later (--merge, same flags, data and seed): "
                      f"{', '.join(r['config'] for r in new_rows)}, each with its own provenance.").strip()
    return rows, merged, old.get("provenance")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "tinyshakespeare", "input.txt"),
                    help="the raw tinyshakespeare input.txt")
    ap.add_argument("--quick", action="store_true", help="first 40K characters, tiny model, 3 configurations, "
                    "a few updates (CI smoke test)")
    ap.add_argument("--configs", default=None, help="comma-separated subset of " + ",".join(ALL_CONFIGS))
    ap.add_argument("--out", default="benchmarks/results/char_lm.json")
    ap.add_argument("--png", default=None, help="also draw validation bpc against updates")
    ap.add_argument("--workdir", default="/tmp/rmt_char_lm", help="data-bin, checkpoints and logs (recreated)")
    ap.add_argument("--max-update", type=int, default=None, help="updates per configuration (default 1500)")
    ap.add_argument("--validate-every", type=int, default=None, help="updates between validations (default 250)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--merge", action="store_true", help="add the rows run now to the existing --out JSON (same "
                    "setup required), replacing rows of the same configuration")
    ap.add_argument("--report-only", action="store_true", help="train nothing: rebuild the table, JSON and plot "
                    "from the logs a previous run left in --workdir (configurations without both logs are left out)")
    a = ap.parse_args(argv)
    if not os.path.isfile(a.data):
        raise SystemExit(f"error: --data: no such file {a.data!r} (the tinyshakespeare input.txt)")
    configs = a.configs.split(",") if a.configs else (QUICK_CONFIGS if a.quick else ALL_CONFIGS)
    for c in configs:
        config_flags(c)
    max_update = a.max_update or (6 if a.quick else 1500)
    every = a.validate_every or (3 if a.quick else 250)
    # backbone: layers, C, heads, FFN, segment T, streams B
    L, C, H, F, T, B = (2, 32, 2, 64, 32, 4) if a.quick else (4, 128, 4, 512, 64, 8)

    with open(a.data, encoding="utf-8") as f:
        text = f.read()
    if a.quick:
        text = text[:40000]
    raw, bin_dir = os.path.join(a.workdir, "raw"), os.path.join(a.workdir, "data-bin")
    bindir = os.path.dirname(console_script("fairseq-train"))
    if a.report_only:
        chars = {k: b - a for k, (a, b) in split_bounds(len(text)).items()}
    else:
        shutil.rmtree(a.workdir, ignore_errors=True)
        chars = write_splits(text, raw)
        run([os.path.join(bindir, "fairseq-preprocess"), "--only-source", "--trainpref", f"{raw}/train.txt",
             "--validpref", f"{raw}/valid.txt", "--testpref", f"{raw}/test.txt", "--destdir", bin_dir,
             "--workers", "2"], os.path.join(a.workdir, "preprocess.log"))

    common = [bin_dir, "--user-dir", os.path.join(REPO, "user_dir"), "--task", "rmt_lm", "--arch", "rmt_lm",
              "--criterion", "rmt_cross_entropy", "--decoder-layers", str(L), "--decoder-embed-dim", str(C),
              "--decoder-attention-heads", str(H), "--decoder-ffn-embed-dim", str(F),
              "--share-decoder-input-output-embed", "--dropout", "0.1", "--tokens-per-sample", str(T),
              "--batch-size", str(B), "--optimizer", "adam", "--adam-betas", "(0.9, 0.99)", "--lr", "2e-3",
              "--lr-scheduler", "cosine", "--warmup-updates", str(max(1, max_update // 20)),
              "--warmup-init-lr", "1e-7", "--min-lr", "1e-4", "--clip-norm", "1.0", "--max-update", str(max_update),
              "--validate-interval-updates", str(every), "--save-interval-updates", "0", "--no-epoch-checkpoints",
              "--log-format", "json", "--log-interval", str(every), "--seed", str(a.seed), "--cpu",
              "--num-workers", "0"]
    setup = {"corpus": a.data, "characters": chars, "layers": L, "dim": C, "heads": H, "ffn": F, "segment": T,
             "streams": B, "max_update": max_update, "validate_every": every, "seed": a.seed, "quick": a.quick,
             "dropout": 0.1, "lr": 2e-3, "wall_seconds": None}
    if a.merge:
        merge(a.out, [], setup)  # the same setup as the earlier results, checked before anything is trained
    rows, t_all = [], time.perf_counter()
    for name in configs:
        save = os.path.join(a.workdir, "checkpoints", name)
        train_log, eval_log = os.path.join(a.workdir, f"train_{name}.log"), os.path.join(a.workdir, f"eval_{name}.log")
        if a.report_only:
            if not (os.path.exists(train_log) and os.path.exists(eval_log)):
                continue
            log, out = open(train_log).read(), open(eval_log).read()
            m = re.search(r"done training in ([0-9.]+) seconds", log)
            train_s, eval_s = (float(m.group(1)) if m else None), None  # fairseq's own training time
        else:
            log, train_s = run([os.path.join(bindir, "fairseq-train")] + common + config_flags(name)
                               + ["--save-dir", save], train_log)
            out, eval_s = run([os.path.join(bindir, "fairseq-eval-lm"), bin_dir, "--user-dir",
                               os.path.join(REPO, "user_dir"), "--task", "rmt_lm", "--path",
                               f"{save}/checkpoint_last.pt", "--gen-subset", "test", "--batch-size", "1",
                               "--tokens-per-sample", str(T), "--cpu"], eval_log)
        train_curve, valid_curve = parse_curves(log)
        m = re.search(r"Loss \(base 2\): ([0-9.]+)", out)
        if not m:
            raise SystemExit(f"error: no 'Loss (base 2)' in fairseq-eval-lm output; log: {a.workdir}/eval_{name}.log")
        row = {"config": name, "flags": config_flags(name), "test_bpc": float(m.group(1)),
               "final_valid_bpc": valid_curve[-1][1] if valid_curve else None, "train_seconds": train_s,
               "eval_seconds": eval_s, "valid_curve": valid_curve, "train_curve": train_curve}
        if a.merge:
            row["provenance"] = provenance()  # rows of the earlier run keep theirs (the file's)
        rows.append(row)
        print(f"{name:<9} test bpc {row['test_bpc']:.4f}  valid bpc {row['final_valid_bpc']}  "
              f"train {train_s or 0:7.1f} s  eval {eval_s or 0:5.1f} s", flush=True)

    setup["wall_seconds"] = time.perf_counter() - t_all
    prov = provenance()
    if a.merge:
        rows, setup, prov = merge(a.out, rows, setup)
    print("\n| config | test bpc | valid bpc | train s |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['config']} | {r['test_bpc']:.4f} | {r['final_valid_bpc']} | {r['train_seconds'] or 0:.0f} |")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"setup": setup, "rows": rows, "provenance": prov}, f, indent=2)
    if a.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in rows:
            if r["valid_curve"]:
                ax.plot(*zip(*r["valid_curve"]), marker=".", label=f"{r['config']} (test {r['test_bpc']:.3f})")
        ax.set(xlabel="updates", ylabel="validation bits per character",
               title=f"tinyshakespeare, {L} layers C={C}, segment {T}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.png, dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
