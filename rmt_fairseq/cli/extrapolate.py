"""`rmt-extrapolate`: accuracy of a trained rmt_algorithmic checkpoint on longer inputs than it was trained on.

    rmt-extrapolate --path CKPT --data DATA-BIN --task copy --src-lens 10,20,40 --segment-len 11 --out DIR

For every source length: generate --num-samples fresh samples (rmt-data's generator, another seed than the
training data), binarize them with the checkpoint's dictionary (fairseq-preprocess --srcdict), split them into
segments of --segment-len (the training segment length, so longer inputs mean more segments) and score them
with greedy decoding across segment boundaries. Prints a table and writes DIR/extrapolation.json and
DIR/extrapolation.png (accuracy against the number of segments).
"""

import argparse
import json
import os
import subprocess
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(prog="rmt-extrapolate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", required=True, help="checkpoint trained with --task rmt_algorithmic")
    ap.add_argument("--data", required=True, help="the training data-bin directory (for dict.txt)")
    ap.add_argument("--task", required=True, choices=["copy", "reverse", "associative_retrieval"], help="generator")
    ap.add_argument("--src-lens", required=True,
                    help="comma-separated source lengths, e.g. 10,20,40 (associative_retrieval: numbers of pairs)")
    ap.add_argument("--segment-len", type=int, required=True, help="segment length T used in training")
    ap.add_argument("--vocab-size", type=int, help="as for rmt-data (default: 10; associative_retrieval 36)")
    ap.add_argument("--num-samples", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--out", required=True, help="output directory")
    a = ap.parse_args(argv)
    try:
        lens = [int(x) for x in a.src_lens.split(",")]
    except ValueError:
        ap.error(f"--src-lens must be comma-separated integers, got {a.src_lens!r}")
    for flag, v in [("--src-lens", min(lens)), ("--segment-len", a.segment_len), ("--num-samples", a.num_samples),
                    ("--batch-size", a.batch_size)]:
        if v < 1:
            ap.error(f"{flag} must be >= 1, got {v}")
    for flag, path in [("--path", a.path), ("--data", os.path.join(a.data, "dict.txt"))]:
        if not os.path.exists(path):
            ap.error(f"{flag}: {path} does not exist")

    import torch
    from fairseq import checkpoint_utils

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    import user_dir  # noqa: F401
    from rmt_fairseq.data.algorithmic import generate
    from rmt_fairseq.modules.recurrence import RecurrentState

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [a.path], arg_overrides={"data": a.data, "tokens_per_sample": a.segment_len, "segment_curriculum": False})
    model = models[0].eval()
    criterion = task.build_criterion(_criterion_cfg())
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for n in lens:
        raw, bin_dir = os.path.join(a.out, f"len{n}", "raw"), os.path.join(a.out, f"len{n}", "bin")
        os.makedirs(raw, exist_ok=True)
        with open(os.path.join(raw, "test.txt"), "w") as f:
            if a.task == "associative_retrieval":
                kw = {"num_pairs": n, "vocab_size": a.vocab_size or 36}
            else:
                kw = {"src_len": n, "vocab_size": a.vocab_size or 10}
            try:
                lines = generate(a.task, a.num_samples, seed=a.seed + n, **kw)
            except ValueError as e:
                ap.error(str(e))
            f.write("\n".join(lines) + "\n")
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "fairseq-preprocess"), "--only-source",
                        "--testpref", os.path.join(raw, "test.txt"), "--srcdict", os.path.join(a.data, "dict.txt"),
                        "--destdir", bin_dir, "--workers", "1"], check=True, capture_output=True)
        task.cfg.data = bin_dir
        task.load_dataset("test")
        itr = task.get_batch_iterator(task.dataset("test"), max_sentences=a.batch_size).next_epoch_itr(shuffle=False)
        tot = {"greedy_correct": 0, "greedy_total": 0, "greedy_exact": 0, "nseq": 0}
        segments = None
        with torch.no_grad():
            for sample in itr:
                sample["rmt_state"] = RecurrentState()
                _, _, log = task.valid_step(sample, model, criterion)
                segments = sample["num_segments"]
                for k in tot:
                    tot[k] += log[k]
        tokens = {"copy": 3 * n + 1, "reverse": 2 * n + 1, "associative_retrieval": 2 * n + 3}[a.task]
        row = {"src_len": n, "tokens": tokens, "segments": segments,
               "acc": 100.0 * tot["greedy_correct"] / tot["greedy_total"],
               "em": 100.0 * tot["greedy_exact"] / tot["nseq"]}
        rows.append(row)
        print(f"src_len {n:>5}  segments {segments:>4}  token acc {row['acc']:6.2f}%  exact match {row['em']:6.2f}%",
              flush=True)
    with open(os.path.join(a.out, "extrapolation.json"), "w") as f:
        json.dump({"checkpoint": a.path, "task": a.task, "segment_len": a.segment_len, "results": rows}, f, indent=2)
    _plot(rows, os.path.join(a.out, "extrapolation.png"), a.task)
    print(f"wrote {a.out}/extrapolation.json and {a.out}/extrapolation.png")
    return 0


def _criterion_cfg():
    from omegaconf import OmegaConf

    return OmegaConf.create({"_name": "rmt_cross_entropy", "checkpoint_segments": False})


def _plot(rows, path, task):
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq sets the root logger to DEBUG
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["segments"] for r in rows], [r["acc"] for r in rows], marker="o", label="token acc")
    ax.plot([r["segments"] for r in rows], [r["em"] for r in rows], marker="s", label="exact match")
    ax.set(xlabel="segments per sample", ylabel="test %, greedy", ylim=(0, 101), title=f"{task}: extrapolation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
