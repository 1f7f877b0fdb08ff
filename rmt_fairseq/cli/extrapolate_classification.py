"""`rmt-extrapolate-classify`: accuracy of an rmt_long_classification checkpoint on documents far longer than
it was trained on, streamed segment by segment with constant memory ("Scaling Transformer to 1M tokens", §4).

    rmt-extrapolate-classify --path CKPT --data DATA --out DIR [--max-tokens 1000000] [--segments 1,2,8,...]

DATA is the generated data directory the checkpoint was trained on (rmt-data memorization: the task, noise
and dictionary). Documents come from the test split's stream at each length (--subset valid: the validation
split's, to choose a recipe without looking at test); only the memory state and one chunk of --chunk-segments
segments are held at a time, so memory does not grow with the length. The default lengths are N, 2N, 8N,
32N, ... segments (N: the curriculum stage the checkpoint reached), then the first length reaching --max-tokens.
Segments are the --tokens-per-sample the checkpoint was trained with (read from its config; there is no flag to
change it). Prints a table (accuracy, time per token, resident memory) to stdout,
progress and fairseq's logs to stderr, and writes DIR/extrapolation.json (rows, the trained segment length and
number of segments, the chance level 100 / classes) and DIR/extrapolation.png (accuracy with the chance level
and the trained length marked; time per token and resident memory).
"""

import json
import logging
import math
import os
import sys
import time

logger = logging.getLogger("rmt_fairseq.cli.extrapolate_classification")


def default_lengths(trained: int, seg_len: int, max_tokens: int):
    """N, 2N, 8N, 32N, ... segments below max_tokens, then the first length reaching it."""
    lengths, n = [trained], 2 * trained
    while n * seg_len < max_tokens:
        lengths.append(n)
        n *= 4
    last = math.ceil(max_tokens / seg_len)
    if last > lengths[-1]:
        lengths.append(last)
    return lengths


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def evaluate_length(task, model, n_seg: int, num_docs: int, batch_size: int, chunk: int,
                    subset: str = "test") -> dict:
    """Accuracy over the first num_docs documents of the `subset` split at n_seg segments, streamed chunk by chunk
    (in the encoder's --inference-schedule)."""
    import torch

    from rmt_fairseq.data.documents import encode
    from rmt_fairseq.modules.recurrence import RecurrentState

    ds = task.datasets[subset]
    T = task.cfg.tokens_per_sample
    correct, tokens_seen, seconds, peak = 0, 0, 0.0, 0.0
    for b0 in range(0, num_docs, batch_size):
        docs = [ds.document(i, length=n_seg * T) for i in range(b0, min(b0 + batch_size, num_docs))]
        labels = torch.tensor([ds.label_index[d.label] for d in docs])
        state, logits = RecurrentState(), None
        for s0 in range(0, n_seg, chunk):
            s1 = min(s0 + chunk, n_seg)
            src = torch.stack([encode(task.dictionary, d.tokens(s0 * T, s1 * T)) for d in docs])  # B x c*T
            t0 = time.perf_counter()
            with torch.no_grad():  # the model's forward, the documents' state carried from chunk to chunk
                logits = model(src, segment_len=T, rmt_state=state)  # B x V, from each chunk's last segment
            seconds += time.perf_counter() - t0
            tokens_seen += src.numel()
            peak = max(peak, rss_mb())
        correct += int((logits.argmax(-1) == labels).sum())
    return {"segments": n_seg, "tokens": n_seg * T, "documents": num_docs, "accuracy": 100.0 * correct / num_docs,
            "us_per_token": 1e6 * seconds / tokens_seen, "rss_mb": round(peak, 1)}


def plot(rows, title, num_classes, trained_tokens):
    """Accuracy, time per token and resident memory against input tokens, with the chance level (1 / classes)
    and the trained length marked; returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    x = [r["tokens"] for r in rows]
    ax[0].plot(x, [r["accuracy"] for r in rows], "o-", label="accuracy")
    ax[0].axhline(100 / num_classes, ls="--", c="gray", label=f"chance: 1 / {num_classes} classes "
                                                              f"({100 / num_classes:.0f}%)")
    for a in ax:
        a.axvline(trained_tokens, ls="-.", c="C3", label=f"trained length ({trained_tokens} tokens)")
    ax[0].set(xscale="log", xlabel="input tokens", ylabel="accuracy (%)", ylim=(0, 105), title=title)
    ax[0].legend(fontsize=8)
    ax[1].plot(x, [r["us_per_token"] for r in rows], "o-", label="time per token (us)")
    ax[1].set(xscale="log", xlabel="input tokens", ylabel="us / token", ylim=(0, None))
    ax2 = ax[1].twinx()
    ax2.plot(x, [r["rss_mb"] for r in rows], "s--", c="C1", label="resident memory (MB)")
    ax2.set(ylabel="RSS MB", ylim=(0, max(r["rss_mb"] for r in rows) * 1.3))
    lines = ax[1].get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax[1].legend(lines, [h.get_label() for h in lines], fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def main(argv=None):
    from rmt_fairseq.cli.data import HelpFormatter, _Parser  # one-line `error:` messages, exit 2
    from rmt_fairseq.modules.recurrence import SCHEDULES

    ap = _Parser(prog="rmt-extrapolate-classify", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--path", required=True, help="checkpoint trained with --task rmt_long_classification")
    ap.add_argument("--data", required=True, help="its generated data directory (generator.json, dict.txt)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--segments", help="comma-separated lengths in segments (default: N, 2N, 8N, ... see above)")
    ap.add_argument("--max-tokens", type=int, default=1_000_000, help="the longest default length, in tokens")
    ap.add_argument("--num-docs", type=int, default=64, help="documents per length")
    ap.add_argument("--subset", choices=["test", "valid"], default="test",
                    help="the split the documents come from: choose recipes on valid, report test")
    ap.add_argument("--batch-size", type=int, default=32, help="documents per batch")
    ap.add_argument("--chunk-segments", type=int, default=64, help="segments tokenized and run per step")
    ap.add_argument("--inference-schedule", choices=SCHEDULES, default=None,
                    help="the checkpoint's by default; diagonal batches the layers of an ARMT (or memoryless) "
                    "encoder's segments by anti-diagonals (the same results), RMT's token memory stays sequential")
    a = ap.parse_args(argv)
    for flag, v in [("--max-tokens", a.max_tokens), ("--num-docs", a.num_docs), ("--batch-size", a.batch_size),
                    ("--chunk-segments", a.chunk_segments)]:
        if v < 1:
            ap.error(f"{flag} must be >= 1, got {v}")
    lengths = None
    if a.segments:
        try:
            lengths = [int(x) for x in a.segments.split(",")]
        except ValueError:
            ap.error(f"--segments must be comma-separated integers, got {a.segments!r}")
        if min(lengths) < 1:
            ap.error(f"--segments must be >= 1, got {a.segments}")
    if not os.path.isfile(a.path):
        ap.error(f"--path {a.path}: no such file")
    if not os.path.isfile(os.path.join(a.data, "generator.json")):
        ap.error(f"--data {a.data} has no generator.json: extrapolation needs generated data (rmt-data memorization)")

    # progress and fairseq's loading logs on stderr: stdout holds the table alone
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stderr)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    from fairseq import checkpoint_utils


    overrides = {"data": a.data}
    state = checkpoint_utils.load_checkpoint_to_cpu(a.path, overrides)
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([a.path], overrides, state=state)
    model = models[0].eval()
    if a.inference_schedule:
        model.encoder.inference_schedule = a.inference_schedule
    if getattr(task, "generator", None) is None:
        ap.error(f"--path {a.path} was not trained with --task rmt_long_classification on generated data")
    # the curriculum stage the run reached (fairseq keeps the task's checkpoint dict in extra_state)
    task.set_checkpoint_dict((state.get("extra_state") or {}).get(type(task).__name__, {}))
    try:
        task.load_dataset(a.subset)
    except Exception as e:  # a generator.json without that split
        ap.error(f"--subset {a.subset}: {e}")
    T = task.cfg.tokens_per_sample
    trained = task.num_segments or 1
    lengths = lengths or default_lengths(trained, T, a.max_tokens)
    logger.info("task %s, segment %d tokens, trained up to %d segments; lengths (segments): %s; %s schedule%s",
                task.generator["task"], T, trained, lengths, model.encoder.inference_schedule,
                "" if model.encoder.inference_schedule == "sequential" or model.encoder.diagonal_ok
                else " requested, sequential used (RMT's token memory cannot be diagonalised)")
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for n in lengths:
        row = evaluate_length(task, model, n, a.num_docs, a.batch_size, a.chunk_segments, a.subset)
        row["x_trained"] = n / trained
        rows.append(row)
        logger.info("%8d segments %10d tokens (%.0fx trained): accuracy %6.2f%%  %.2f us/token  RSS %.0f MB",
                    n, row["tokens"], row["x_trained"], row["accuracy"], row["us_per_token"], row["rss_mb"])
        with open(os.path.join(a.out, "extrapolation.json"), "w") as f:  # rewritten after every length
            json.dump({"checkpoint": os.path.abspath(a.path), "task": task.generator["task"], "segment_len": T,
                       "trained_segment_len": model.encoder.trained_segment_len, "trained_segments": trained,
                       "num_classes": task.num_classes, "subset": a.subset,
                       "chance": 100.0 / task.num_classes, "mem_tokens": model.encoder.num_mem_tokens,
                       "associative_memory": model.encoder.associative,
                       "schedule": model.encoder.inference_schedule if model.encoder.diagonal_ok else "sequential",
                       "rows": rows},
                      f, indent=1)
    print(f"\n{'segments':>9} {'tokens':>10} {'x trained':>9} {'accuracy':>9} {'us/token':>9} {'RSS MB':>7}")
    for r in rows:
        print(f"{r['segments']:>9} {r['tokens']:>10} {r['x_trained']:>9.0f} {r['accuracy']:>8.2f}% "
              f"{r['us_per_token']:>9.2f} {r['rss_mb']:>7.0f}")
    png = os.path.join(a.out, "extrapolation.png")
    plot(rows, f"{task.generator['task']}, trained on {trained} x {T} tokens", task.num_classes,
         trained * T).savefig(png, dpi=110)
    print(f"wrote {os.path.normpath(os.path.join(a.out, 'extrapolation.json'))} and {os.path.normpath(png)}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
