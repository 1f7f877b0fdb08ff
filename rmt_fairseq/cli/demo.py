"""`rmt-demo` (`make demo`): multi-segment copy, solved only with memory (paper Fig 4), on a CPU in minutes.

Generates a copy task (10 symbols, the target is the source twice) split into 3 equal segments, so most of the
target must be written from a segment that never sees the source. Trains rmt_tiny with memory tokens and the
same model without memory for the same number of updates with fairseq-train, evaluates both on the test split
with fairseq-validate (greedy decoding across segment boundaries), prints a table and writes
OUT/results.json and OUT/accuracy.png.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

from rmt_fairseq.cli import console_script
from rmt_fairseq.provenance import provenance

RUNS = [("rmt", ["--mem-tokens", "8"]), ("no_memory", ["--mem-tokens", "0"])]
VALID_RE = re.compile(r"valid on 'valid' subset \| loss ([0-9.]+) \| acc_tf ([0-9.]+) \| em_tf ([0-9.]+) \| "
                      r"acc ([0-9.]+) \| em ([0-9.]+).*num_updates (\d+)")


def _bin(name):
    return console_script(name)


# the checkout's --user-dir shim, by its absolute path: rmt-demo runs from any directory
USER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "user_dir")
PROGRESS_S = 20  # at most this long without a line on the console while a model trains


def _run(cmd, log_path, show=None, progress=None):
    """Run a CLI, keep its full log (written line by line, so `tail -f` follows it), echo the lines `show`
    selects, and a `progress(line)` summary when PROGRESS_S passed without a console line; fail loudly with the
    log's tail."""
    lines, last = [], time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # the child's lines as it logs them, not in 8 KiB blocks
    with open(log_path, "w", buffering=1) as log:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in p.stdout:
            log.write(line)
            lines.append(line)
            if show and show(line):
                print("    " + line.split("| INFO | ")[-1].rstrip(), flush=True)
                last = time.time()
            elif progress and time.time() - last >= PROGRESS_S:
                summary = progress(line)
                if summary:
                    print("    " + summary, flush=True)
                    last = time.time()
        if p.wait() != 0:
            sys.exit(f"demo: {os.path.basename(cmd[0])} failed, see {log_path}:\n{''.join(lines[-20:])}")
    return "".join(lines)


def main(argv=None):
    from rmt_fairseq.cli.data import HelpFormatter  # the description as written, every default shown

    ap = argparse.ArgumentParser(prog="rmt-demo", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--out", default="outputs/demo", help="output directory")
    ap.add_argument("--updates", type=int, default=2000, help="training updates per model")
    ap.add_argument("--src-len", type=int, default=10, help="copy source length")
    ap.add_argument("--num-segments", type=int, default=3, help="segments per sample")
    ap.add_argument("--train-size", type=int, default=20000, help="training samples")
    ap.add_argument("--test-size", type=int, default=1000, help="test samples")
    ap.add_argument("--seed", type=int, default=1, help="seed of the data and of both trainings")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per process (OMP_NUM_THREADS of the runs; default: rmt_fairseq/threads.py's "
                         "choice, 1 for this model)")
    a = ap.parse_args(argv)
    if a.threads is not None:
        if a.threads < 1:
            ap.error(f"--threads must be >= 1, got {a.threads}")
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    for flag, v, low in [("--updates", a.updates, 1), ("--src-len", a.src_len, 1),
                         ("--num-segments", a.num_segments, 1), ("--train-size", a.train_size, 1),
                         ("--test-size", a.test_size, 1)]:
        if v < low:
            ap.error(f"{flag} must be >= {low}, got {v}")
    os.makedirs(a.out, exist_ok=True)
    t_setup = time.time()
    raw, data = os.path.join(a.out, "data", "raw"), os.path.join(a.out, "data", "bin")
    total = 3 * a.src_len + 1
    print(f"[demo] copy task: {a.src_len} source symbols, <gen>, the source twice = {total} tokens in "
          f"{a.num_segments} segments of {-(-total // a.num_segments)}: most of the answer is produced in "
          f"segments that never see the source.", flush=True)
    _run([_bin("rmt-data"), "copy", "--out", raw, "--src-len", str(a.src_len), "--train-size", str(a.train_size),
          "--valid-size", "200", "--test-size", str(a.test_size), "--seed", str(a.seed)],
         os.path.join(a.out, "data.log"))
    shutil.rmtree(data, ignore_errors=True)  # regenerated each run (fairseq-preprocess refuses to overwrite)
    _run([_bin("fairseq-preprocess"), "--only-source", "--trainpref", f"{raw}/train.txt", "--validpref",
          f"{raw}/valid.txt", "--testpref", f"{raw}/test.txt", "--destdir", data, "--workers", "1"],
         os.path.join(a.out, "preprocess.log"))

    common = ["--user-dir", USER_DIR, "--task", "rmt_algorithmic", "--arch", "rmt_tiny", "--criterion",
              "rmt_cross_entropy", "--num-segments", str(a.num_segments), "--batch-size", "32", "--cpu",
              "--num-workers", "0", "--seed", str(a.seed)]
    results = {"task": "copy", "src_len": a.src_len, "num_segments": a.num_segments, "updates": a.updates,
               "models": {}}
    started = time.time()
    setup_seconds = started - t_setup  # data generation and preprocessing
    for name, flags in RUNS:
        save = os.path.join(a.out, f"ckpt_{name}")
        shutil.rmtree(save, ignore_errors=True)  # same budget from scratch: never resume an earlier demo
        print(f"[demo] training {name} ({' '.join(flags)}) for {a.updates} updates; validation every 250 "
              f"with greedy decoding ...", flush=True)
        t0 = time.time()
        log = _run([_bin("fairseq-train"), data, *common, *flags, "--optimizer", "adam", "--lr", "2e-3",
                    "--max-update", str(a.updates), "--validate-interval-updates", "250",
                    "--save-interval-updates", "250", "--keep-interval-updates", "1", "--save-dir", save,
                    "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", "25"],
                   os.path.join(a.out, f"train_{name}.log"), show=lambda s: "valid on" in s,
                   progress=lambda s, t0=t0: _progress(s, a.updates, t0))
        curve = [{"update": int(m[5]), "acc": float(m[3]), "em": float(m[4]), "acc_tf": float(m[1])}
                 for m in VALID_RE.findall(log)]
        print(f"[demo] evaluating {name} on the test split (greedy) ...", flush=True)
        # checkpoint_best.pt: the lowest validation loss of the checks every 250 updates (the last update's can be a
        # dip: 97.94% token accuracy where the best had 99.98%, measured)
        ev = _run([_bin("fairseq-validate"), data, "--user-dir", USER_DIR, "--task", "rmt_algorithmic", "--path",
                   os.path.join(save, "checkpoint_best.pt"), "--valid-subset", "test", "--batch-size", "100",
                   "--num-segments", str(a.num_segments), "--cpu", "--num-workers", "0"],
                  os.path.join(a.out, f"eval_{name}.log"))
        m = re.search(r"loss ([0-9.]+) \| acc_tf ([0-9.]+) \| em_tf ([0-9.]+) \| acc ([0-9.]+) \| em ([0-9.]+)", ev)
        results["models"][name] = {"flags": " ".join(flags), "test_loss": float(m[1]), "test_acc": float(m[4]),
                                   "test_em": float(m[5]), "test_acc_teacher_forced": float(m[2]),
                                   "train_seconds": round(time.time() - t0, 1), "valid_curve": curve}

    print(f"\n{'model':<12}{'memory':<18}{'segments':>9}{'token acc %':>13}{'exact match %':>15}")
    for name, r in results["models"].items():
        print(f"{name:<12}{r['flags']:<18}{a.num_segments:>9}{r['test_acc']:>13.2f}{r['test_em']:>15.2f}")
    results["wall_seconds"] = round(time.time() - started + setup_seconds, 1)
    results["provenance"] = provenance()  # the commit and command (the README's table is rendered from this)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    _plot(results, os.path.join(a.out, "accuracy.png"))
    print(f"\n[demo] wrote {a.out}/results.json and {a.out}/accuracy.png "
          f"(greedy decoding, test split of {a.test_size})")
    return 0


TRAIN_RE = re.compile(r"loss=([0-9.]+).*num_updates=(\d+)")


def _progress(line, updates, t0):
    """A fairseq-train log line of training statistics -> `update N/U, train loss L, S s`, else None."""
    m = TRAIN_RE.search(line)
    return m and f"update {m[2]}/{updates}: train loss {m[1]}, {time.time() - t0:.0f} s"


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results["models"].items():
        c = r["valid_curve"]
        ax1.plot([p["update"] for p in c], [p["acc"] for p in c], marker="o", label=f"{name} ({r['flags']})")
    ax1.set(xlabel="update", ylabel="valid per-token accuracy, greedy (%)", ylim=(0, 101),
            title=f"copy, {results['num_segments']} segments")
    ax1.legend()
    names = list(results["models"])
    x = range(len(names))
    ax2.bar([i - 0.2 for i in x], [results["models"][n]["test_acc"] for n in names], 0.4, label="token acc")
    ax2.bar([i + 0.2 for i in x], [results["models"][n]["test_em"] for n in names], 0.4, label="exact match")
    ax2.set_xticks(list(x), names)
    ax2.set(ylabel="test %", ylim=(0, 101), title="test split, greedy decoding")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
