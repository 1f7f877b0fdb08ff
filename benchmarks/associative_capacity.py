"""Associative-retrieval capacity, RMT against ARMT (Rodkin et al. 2024, arXiv 2407.04841, §4.1): exact match
against the number of key-value pairs N that must be held in memory.

    python benchmarks/associative_capacity.py [--num-pairs 1,2,4,8] [--models rmt,armt] [--max-update 2500] \\
        [--no-curriculum] [--quick] [--out benchmarks/results/associative_capacity.json] [--png PLOT] [--workdir DIR]

Everything through the real CLIs, for each N: `rmt-data associative_retrieval --num-pairs N
--pairs-per-segment P` (the capacity layout: P pairs a segment, the query in the last one, so a pair reaches the
query only through memory), fairseq-preprocess, then for each model fairseq-train --task rmt_algorithmic
--tokens-per-sample T (the layout's segment length: N/P + 1 segments, full BPTT) and fairseq-validate on the test
split (greedy decoding; the checkpoint of the best validation exact match). Both models get the same memory
tokens (--mem-tokens), updates, batch size, learning rate and seed: `rmt` is --arch rmt_tiny, `armt` is
--arch armt_tiny (the same backbone plus --associative-memory). As in the authors' scripts, each N starts from
the same model's best checkpoint at the previous N (--finetune-from-model; every N is binarized with one
dictionary for that), the first N from scratch; --no-curriculum trains every N from scratch. Prints a table
(exact match % against N, with 100/N: what a model scores that keeps every value but not which key it belongs
to) and writes JSON and a PNG.
--quick: N in 2,3, a few updates on a few hundred samples (the CI smoke test; its numbers mean nothing).

Budget (2 CPU cores): per update, about 0.01 s + 0.007 s per segment for rmt_tiny and twice that per segment for
armt_tiny at batch 64, so the default N = 1,2,4,8 (2, 3, 5, 9 segments) at 2,500 updates each is about 20-25
minutes of training for both models. Measured there: without the curriculum, rmt_tiny learns N = 1 in 500
updates but sits at 50% (both values kept, not which key owns which) on N = 2 for 5,000-8,000 updates (77% after
10,000); armt_tiny leaves that plateau after 1,500-2,000, and started from its N = 2 model it reaches 100% on
N = 4 within 1,000 updates.
"""

import argparse
import os
import re
import shutil

from common import run  # a CLI run with its log kept; exits naming the log on failure

from rmt_fairseq.cli import console_script  # noqa: E402
from rmt_fairseq.data.algorithmic import GEN, SEP, SYMBOLS  # noqa: E402
from rmt_fairseq.provenance import write_results  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = {"rmt": "rmt_tiny", "armt": "armt_tiny"}
VALID_RE = re.compile(r"valid on 'valid' subset \| loss ([0-9.]+) \| acc_tf ([0-9.]+) \| em_tf ([0-9.]+) \| "
                      r"acc ([0-9.]+) \| em ([0-9.]+).*num_updates (\d+)")
TEST_RE = re.compile(r"valid on 'test' subset \| loss ([0-9.]+) \| acc_tf ([0-9.]+) \| em_tf ([0-9.]+) \| "
                     r"acc ([0-9.]+) \| em ([0-9.]+)")
DONE_RE = re.compile(r"done training in ([0-9.]+) seconds")


def _ints(text: str, flag: str):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"error: {flag} takes comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise SystemExit(f"error: {flag} values must be >= 1, got {text!r}")
    return values


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-pairs", default=None, help="comma-separated N, increasing (default 1,2,4,8; quick 2,3)")
    ap.add_argument("--models", default="rmt,armt", help=f"comma-separated, of {', '.join(ARCHS)}")
    ap.add_argument("--pairs-per-segment", type=int, default=1, help="P (the authors' scripts: 1)")
    ap.add_argument("--mem-tokens", type=int, default=4, help="memory tokens of every model")
    ap.add_argument("--max-update", type=int, default=None, help="updates per N and model (default 2500; quick 20)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam, constant, clip-norm 1")
    ap.add_argument("--train-size", type=int, default=None, help="training samples (default 50000; quick 300)")
    ap.add_argument("--test-size", type=int, default=None, help="test samples (default 1000; quick 50)")
    ap.add_argument("--valid-interval", type=int, default=None, help="updates between validations (default 250)")
    ap.add_argument("--no-curriculum", dest="curriculum", action="store_false",
                    help="train every N from scratch (default: each N from the same model's best checkpoint at the "
                         "previous N, as the authors' scripts do)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the data and of every training")
    ap.add_argument("--quick", action="store_true", help="tiny run for CI: N in 2,3, few updates")
    ap.add_argument("--out", default="benchmarks/results/associative_capacity.json")
    ap.add_argument("--png", default=None, help="plot (default: --out with .png)")
    ap.add_argument("--workdir", default="/tmp/rmt_associative_capacity", help="data, checkpoints, logs (recreated)")
    a = ap.parse_args(argv)
    pairs = _ints(a.num_pairs or ("2,3" if a.quick else "1,2,4,8"), "--num-pairs")
    if pairs != sorted(set(pairs)):
        raise SystemExit(f"error: --num-pairs must increase (the curriculum goes from each N to the next), got "
                         f"{a.num_pairs!r}")
    models = a.models.split(",")
    if not models or set(models) - set(ARCHS):
        raise SystemExit(f"error: --models takes names of {', '.join(ARCHS)}, got {a.models!r}")
    max_update = a.max_update or (20 if a.quick else 2500)
    train_size = a.train_size or (300 if a.quick else 50000)
    test_size = a.test_size or (50 if a.quick else 1000)
    valid_size = 50 if a.quick else 500
    interval = a.valid_interval or (10 if a.quick else 250)
    png = a.png or os.path.splitext(a.out)[0] + ".png"
    P = a.pairs_per_segment

    bindir = os.path.dirname(console_script("fairseq-train"))
    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir)
    vocab = os.path.join(a.workdir, "dict.txt")  # one dictionary for every N: --curriculum carries the model over
    with open(vocab, "w") as f:
        f.write("".join(f"{t} 1\n" for t in SYMBOLS + [SEP, GEN]))
    rows, previous = [], {}
    for N in pairs:
        raw, data = os.path.join(a.workdir, f"raw_n{N}"), os.path.join(a.workdir, f"bin_n{N}")
        log, _ = run([os.path.join(bindir, "rmt-data"), "associative_retrieval", "--out", raw, "--num-pairs", str(N),
                      "--pairs-per-segment", str(P), "--train-size", str(train_size), "--valid-size",
                      str(valid_size), "--test-size", str(test_size), "--seed", str(a.seed)],
                     os.path.join(a.workdir, f"data_n{N}.log"))
        S, T = map(int, re.search(r"(\d+) segments of (\d+) tokens", log).groups())  # the layout rmt-data chose
        run([os.path.join(bindir, "fairseq-preprocess"), "--only-source", "--srcdict", vocab,
             "--trainpref", f"{raw}/train.txt",
             "--validpref", f"{raw}/valid.txt", "--testpref", f"{raw}/test.txt", "--destdir", data, "--workers", "1"],
            os.path.join(a.workdir, f"preprocess_n{N}.log"))
        for name in models:
            save = os.path.join(a.workdir, f"ckpt_{name}_n{N}")
            start = ["--finetune-from-model", previous[name]] if a.curriculum and name in previous else []
            log, secs = run([os.path.join(bindir, "fairseq-train"), data, "--user-dir", os.path.join(REPO, "user_dir"),
                             "--task", "rmt_algorithmic", "--arch", ARCHS[name], "--mem-tokens", str(a.mem_tokens),
                             "--criterion", "rmt_cross_entropy", "--tokens-per-sample", str(T),
                             "--batch-size", str(a.batch_size), "--optimizer", "adam", "--lr", str(a.lr),
                             "--clip-norm", "1.0", "--max-update", str(max_update), "--max-epoch", "100000",
                             "--validate-interval-updates", str(interval), "--validate-interval", "100000",
                             "--save-interval-updates", str(interval), "--keep-interval-updates", "1",
                             "--no-epoch-checkpoints", "--no-last-checkpoints", "--no-save-optimizer-state",
                             "--best-checkpoint-metric", "em", "--maximize-best-checkpoint-metric",
                             "--save-dir", save, "--seed", str(a.seed), "--num-workers", "0", "--cpu",
                             "--log-format", "simple", "--log-interval", str(interval), *start],
                            os.path.join(a.workdir, f"train_{name}_n{N}.log"))
            curve = [{"update": int(m[5]), "em": float(m[4])} for m in VALID_RE.findall(log)]
            ev, _ = run([os.path.join(bindir, "fairseq-validate"), data, "--user-dir", os.path.join(REPO, "user_dir"),
                         "--task", "rmt_algorithmic", "--path", os.path.join(save, "checkpoint_best.pt"),
                         "--valid-subset", "test", "--batch-size", "250", "--tokens-per-sample", str(T), "--cpu",
                         "--num-workers", "0"], os.path.join(a.workdir, f"test_{name}_n{N}.log"))
            previous[name] = os.path.join(save, "checkpoint_best.pt")
            m = TEST_RE.search(ev)
            done = DONE_RE.search(log)
            rows.append({"num_pairs": N, "model": name, "arch": ARCHS[name], "segments": S, "segment_len": T,
                         "test_exact_match": float(m[5]), "test_loss": float(m[1]),
                         "best_valid_exact_match": max((c["em"] for c in curve), default=None),
                         "train_seconds": float(done[1]) if done else round(secs, 1),
                         "started_from": f"{name} at N={pairs[pairs.index(N) - 1]}" if start else "scratch",
                         "valid_curve": curve})
            print(f"N={N:<3} {name:<5} test exact match {float(m[5]):6.2f}%  ({S} segments of {T}, "
                  f"{rows[-1]['train_seconds']:.0f} s of training)", flush=True)

    result = {
        "setup": {"pairs_per_segment": P, "mem_tokens": a.mem_tokens, "archs": {n: ARCHS[n] for n in models},
                  "max_update": max_update, "batch_size": a.batch_size, "lr": a.lr, "train_size": train_size,
                  "valid_size": valid_size, "test_size": test_size, "valid_interval": interval, "seed": a.seed,
                  "quick": a.quick, "vocab_size": 36, "curriculum": a.curriculum,
                  "checkpoint": "best validation exact match (greedy), evaluated on the test split"},
        "rows": rows,
    }
    write_results(a.out, result)
    _plot(result, models, pairs, png)
    print(f"\nexact match (%) on the test split, greedy; {a.mem_tokens} memory tokens, {max_update} updates per N"
          f"{' (each N from the previous N)' if a.curriculum else ' (from scratch)'}, batch {a.batch_size}, lr {a.lr}; "
          f"{P} pair(s) a segment")
    print(f"{'N':>4} {'segments':>9} " + " ".join(f"{n:>7}" for n in models) + f" {'100/N':>7}")
    for N in pairs:
        em = {r["model"]: r["test_exact_match"] for r in rows if r["num_pairs"] == N}
        S = next(r["segments"] for r in rows if r["num_pairs"] == N)
        print(f"{N:>4} {S:>9} " + " ".join(f"{em[n]:>7.2f}" for n in models) + f" {100 / N:>7.2f}")
    print(f"wrote {a.out} and {png}")


def _plot(result, models, pairs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in models:
        pts = [(r["num_pairs"], r["test_exact_match"]) for r in result["rows"] if r["model"] == name]
        ax.plot(*zip(*pts), marker="o", label=f"{name} ({result['setup']['archs'][name]})")
    ax.plot(pairs, [100 / n for n in pairs], ls=":", color="grey", label="100/N (values kept, keys not)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(pairs, [str(n) for n in pairs])
    s = result["setup"]
    ax.set(xlabel="key-value pairs N (one segment each, query in the last)", ylabel="test exact match (%)",
           ylim=(0, 101), title=f"associative retrieval: {s['mem_tokens']} memory tokens, {s['max_update']} updates "
                                f"per N{', curriculum' if s['curriculum'] else ''}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
