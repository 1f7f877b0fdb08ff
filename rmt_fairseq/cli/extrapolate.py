"""`rmt-extrapolate`: accuracy of a trained rmt_algorithmic checkpoint on longer inputs than it was trained on.

    rmt-extrapolate --path CKPT --src-lens 10,20,40 --out DIR > table.txt

What the model was trained with comes from the checkpoint and its training data (--data, default: the data-bin
it was trained on): the segment length T (recorded by --task rmt_algorithmic as `trained_segment_len`; for an
older checkpoint, its --tokens-per-sample or its --num-segments over the train split), the generator (copy,
reverse or associative_retrieval, recognised from the training samples) and its vocabulary (the dictionary's
symbols). For every source length: generate --num-samples fresh samples (rmt-data's generator, another seed
than the training data), binarize them with the checkpoint's dictionary (fairseq-preprocess --srcdict), split
them into segments of T (longer inputs mean more segments, not longer ones) and score them with greedy decoding
across segment boundaries.

A --segment-len other than the trained one is refused: the model never saw that layout, so its scores say
little about extrapolation (issue 16: the demo checkpoint, trained at T = 11, reported 56.72% at 8 instead of
100%). --allow-other-segment-len evaluates it anyway, with a warning.

The table goes to stdout once the model is loaded (fairseq's loading logs only warnings, on stderr), so
`> table.txt` keeps a clean table. Writes DIR/extrapolation.json (rows, the trained segment length and number of
segments, the chance level) and DIR/extrapolation.png: accuracy against segments per sample, with
  chance              token accuracy of uniform guessing over the task's answer symbols (100 / vocabulary)
  no-memory bound     the best token accuracy of greedy decoding that sees only the current segment (samples are
                      uniform and independent): a target token is certain when its source symbol, or an earlier
                      certain copy of it, lies in the segment that predicts it; otherwise it is a guess
  trained length      the length of the training samples, in segments of the evaluated length
"""

import json
import logging
import math
import os
import subprocess
import sys

from rmt_fairseq.cli import console_script
from rmt_fairseq.cli.data import HelpFormatter, _Parser

TASKS = ["copy", "reverse", "associative_retrieval"]
DEFAULT_VOCAB = {"copy": 10, "reverse": 10, "associative_retrieval": 36}


def sample_tokens(task: str, n: int) -> int:
    """Input tokens of one sample (source, <gen>, target) for source length / number of pairs n."""
    return {"copy": 3 * n + 1, "reverse": 2 * n + 1, "associative_retrieval": 2 * n + 3}[task]


def chance(vocab_size: int) -> float:
    """Token accuracy (%) of uniform guessing over the answer symbols (every task answers with source symbols)."""
    return 100.0 / vocab_size


def no_memory_bound(task: str, n: int, seg_len: int, vocab_size: int) -> float:
    """Best token accuracy (%) of greedy decoding by a model that sees only the current segment of T = seg_len
    tokens (positions i // T), for samples of uniform, independent symbols. The token at position q is predicted
    from input q-1: certain when a position holding its value (the source symbol, or an earlier target token
    that was itself certain) lies in segment (q-1) // T; otherwise a guess, right 1 / vocabulary of the time
    (greedy decoding reads back its own guesses, which carry nothing)."""
    seg = lambda i: i // seg_len  # noqa: E731
    if task == "associative_retrieval":
        # k1 v1 ... kn vn q <gen> v: the answer is predicted at <gen>; it needs the query and its pair in view
        s = seg(2 * n + 1)
        sure = sum(seg(2 * i) == seg(2 * i + 1) == seg(2 * n) == s for i in range(n))
        return 100.0 * (sure + (n - sure) / vocab_size) / n
    length = 2 * n if task == "copy" else n
    carriers = {j: [j] for j in range(n)}  # source symbol j -> positions known to hold it
    sure = 0
    for t in range(length):
        q, j = n + 1 + t, (t % n if task == "copy" else n - 1 - t)
        if any(seg(p) == seg(q - 1) for p in carriers[j]):
            carriers[j].append(q)
            sure += 1
    return 100.0 * (sure + (length - sure) / vocab_size) / length


def recognise(samples) -> str:
    """The generator of tokenised samples (lists of symbols "source <gen> target"), or None."""
    from rmt_fairseq.data.algorithmic import GEN

    found = set()
    for toks in samples:
        if toks.count(GEN) != 1:
            return None
        g = toks.index(GEN)
        src, tgt = toks[:g], toks[g + 1 :]
        if tgt == src + src:
            found.add("copy")
        elif tgt == src[::-1]:
            found.add("reverse")
        elif len(src) % 2 == 1 and len(src) >= 3 and len(tgt) == 1 and dict(zip(src[:-1:2], src[1::2])).get(
                src[-1]) == tgt[0] and len(set(src[:-1:2])) == len(src) // 2:
            found.add("associative_retrieval")
        else:
            return None
    return found.pop() if len(found) == 1 else None


def read_samples(data: str, split: str, dictionary, limit: int = 50):
    """The first `limit` samples of a binarized split as lists of symbols (no closing </s>), or []."""
    from fairseq.data import indexed_dataset

    path = os.path.join(data, split)
    if not os.path.isfile(path + ".bin") or os.path.getsize(path + ".bin") == 0:
        return []
    impl = indexed_dataset.infer_dataset_impl(path)
    ds = indexed_dataset.make_dataset(path, impl=impl) if impl else None
    if ds is None:
        return []
    return [[dictionary[int(t)] for t in ds[i][:-1]] for i in range(min(limit, len(ds)))]


def main(argv=None):
    ap = _Parser(prog="rmt-extrapolate", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--path", required=True, help="checkpoint trained with --task rmt_algorithmic")
    ap.add_argument("--src-lens", required=True,
                    help="comma-separated source lengths, e.g. 10,20,40 (associative_retrieval: numbers of pairs)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--data", help="the training data-bin (dict.txt, the train split); default: the one the "
                                   "checkpoint was trained on")
    ap.add_argument("--task", choices=TASKS, help="generator; default: recognised from the training samples")
    ap.add_argument("--segment-len", type=int,
                    help="segment length T; default: the one the model was trained with (from the checkpoint)")
    ap.add_argument("--allow-other-segment-len", action="store_true",
                    help="evaluate at a --segment-len other than the trained one (a warning, not an error)")
    ap.add_argument("--vocab-size", type=int,
                    help="source symbols, as for rmt-data; default: those of the checkpoint's dictionary")
    ap.add_argument("--num-samples", type=int, default=500, help="samples per source length")
    ap.add_argument("--batch-size", type=int, default=100, help="samples per batch")
    ap.add_argument("--seed", type=int, default=12345, help="generator seed; each source length adds itself to it")
    a = ap.parse_args(argv)
    try:
        lens = [int(x) for x in a.src_lens.split(",")]
    except ValueError:
        ap.error(f"--src-lens must be comma-separated integers, got {a.src_lens!r}")
    for flag, v in [("--src-lens", min(lens)), ("--segment-len", a.segment_len), ("--num-samples", a.num_samples),
                    ("--batch-size", a.batch_size)]:
        if v is not None and v < 1:
            ap.error(f"{flag} must be >= 1, got {v}")
    if not os.path.isfile(a.path):
        ap.error(f"--path {a.path}: no such file")

    # fairseq's loading logs stay off stdout (the table's) and below WARNING
    logging.basicConfig(format="%(levelname)s | %(name)s | %(message)s", level=logging.WARNING, stream=sys.stderr)
    for name in ("fairseq", "fairseq_cli", "rmt_fairseq", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import torch
    from fairseq import checkpoint_utils
    from fairseq.data import Dictionary
    from fairseq.dataclass.utils import overwrite_args_by_name

    from rmt_fairseq.data.algorithmic import SYMBOLS, generate
    from rmt_fairseq.errors import RMTConfigError
    from rmt_fairseq.modules.recurrence import RecurrentState
    from rmt_fairseq.tasks.rmt_algorithmic import trained_layout

    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(a.path)
        task_cfg = state["cfg"]["task"]
    except Exception as e:  # a truncated file, a bare state dict, not a checkpoint
        ap.error(f"--path {a.path} is not a fairseq checkpoint with its config ({type(e).__name__}: {e})")
    if task_cfg.get("_name") != "rmt_algorithmic":
        ap.error(f"--path {a.path} was trained with --task {task_cfg.get('_name')}, not rmt_algorithmic")
    data = a.data or task_cfg.get("data")
    if not data or not os.path.isfile(os.path.join(data, "dict.txt")):
        which = "--data" if a.data else f"the checkpoint's training data ({data}; pass --data)"
        ap.error(f"{which}: {os.path.join(data or '', 'dict.txt')} does not exist")
    dictionary = Dictionary.load(os.path.join(data, "dict.txt"))

    trained = trained_layout(state, data)
    T_trained = trained["segment_len"]
    if a.segment_len is None:
        if T_trained is None:
            ap.error(f"--path {a.path} records no segment length and {data} has no train split of equal-length "
                     f"samples to work it out from: pass --segment-len")
        T = T_trained
    else:
        T = a.segment_len
        if T_trained is not None and T != T_trained:
            if not a.allow_other_segment_len:
                ap.error(f"--segment-len {T} differs from the segment length the model was trained with "
                         f"({T_trained}); drop --segment-len to use {T_trained}, or add --allow-other-segment-len "
                         f"to evaluate at {T} anyway")
            print(f"warning: --segment-len {T} differs from the segment length the model was trained with "
                  f"({T_trained}): evaluating at {T} (--allow-other-segment-len)", file=sys.stderr)

    seen = read_samples(data, "train", dictionary) or read_samples(data, "valid", dictionary)
    found = recognise(seen) if seen else None
    if a.task is None and found is None:
        ap.error(f"the samples of {data} are not copy, reverse or associative_retrieval ones: pass --task")
    if a.task is not None and found is not None and a.task != found:
        ap.error(f"--task {a.task} differs from the task the model was trained on ({found}, from the samples of "
                 f"{data}); drop --task")
    task_name = a.task or found
    known = [i for i, s in enumerate(SYMBOLS) if dictionary.index(s) != dictionary.unk()]
    vocab = a.vocab_size or (max(known) + 1 if known else DEFAULT_VOCAB[task_name])
    if a.vocab_size is not None and not 2 <= a.vocab_size <= len(SYMBOLS):
        ap.error(f"--vocab-size must be in [2, {len(SYMBOLS)}], got {a.vocab_size}")
    unknown = [s for s in SYMBOLS[:vocab] if dictionary.index(s) == dictionary.unk()]
    if unknown:
        ap.error(f"--vocab-size {vocab} uses symbols the model's dictionary ({data}/dict.txt) does not have: "
                 f"{' '.join(unknown)}")
    if task_name == "associative_retrieval" and max(lens) > vocab:
        ap.error(f"--src-lens {max(lens)} pairs need distinct keys: at most the vocabulary ({vocab})")
    trained_src = None
    if seen and found:
        g = seen[0].index("<gen>")
        trained_src = g if task_name != "associative_retrieval" else g // 2

    overwrite_args_by_name(state["cfg"], {"data": data, "tokens_per_sample": T, "segment_curriculum": False,
                                          "no_eval_greedy": False})  # greedy decoding is what is scored
    try:
        models, _, task = checkpoint_utils.load_model_ensemble_and_task([a.path], state=state)
    except RMTConfigError as e:  # e.g. --data with another dictionary than the model's
        ap.error(str(e))
    model = models[0].eval()
    criterion = task.build_criterion(_criterion_cfg())
    p_chance = chance(vocab)
    print(f"{task_name}, {vocab} symbols (chance {p_chance:.2f}%); trained: "
          f"{trained['sample_len'] or '?'}-token samples in {trained['num_segments'] or '?'} segments of "
          f"{T_trained or '?'} ({trained['source']}); evaluated in segments of {T}", file=sys.stderr)
    os.makedirs(a.out, exist_ok=True)
    print(f"{'src_len':>7} {'tokens':>7} {'segments':>8} {'token acc %':>11} {'exact match %':>13} "
          f"{'no-memory bound %':>17}", flush=True)
    rows = []
    for n in lens:
        raw, bin_dir = os.path.join(a.out, f"len{n}", "raw"), os.path.join(a.out, f"len{n}", "bin")
        os.makedirs(raw, exist_ok=True)
        if task_name == "associative_retrieval":
            kw = {"num_pairs": n, "vocab_size": vocab}
        else:
            kw = {"src_len": n, "vocab_size": vocab}
        with open(os.path.join(raw, "test.txt"), "w") as f:
            f.write("\n".join(generate(task_name, a.num_samples, seed=a.seed + n, **kw)) + "\n")
        subprocess.run([console_script("fairseq-preprocess"), "--only-source",
                        "--testpref", os.path.join(raw, "test.txt"), "--srcdict", os.path.join(data, "dict.txt"),
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
        row = {"src_len": n, "tokens": sample_tokens(task_name, n), "segments": segments,
               "acc": 100.0 * tot["greedy_correct"] / tot["greedy_total"],
               "em": 100.0 * tot["greedy_exact"] / tot["nseq"],
               "no_memory_bound": no_memory_bound(task_name, n, T, vocab)}
        rows.append(row)
        print(f"{n:>7} {row['tokens']:>7} {segments:>8} {row['acc']:>11.2f} {row['em']:>13.2f} "
              f"{row['no_memory_bound']:>17.2f}", flush=True)
    json_path, png_path = os.path.join(a.out, "extrapolation.json"), os.path.join(a.out, "extrapolation.png")
    with open(json_path, "w") as f:
        json.dump({"checkpoint": a.path, "data": data, "task": task_name, "vocab_size": vocab, "segment_len": T,
                   "trained_segment_len": T_trained, "trained_segments": trained["num_segments"],
                   "trained_src_len": trained_src, "chance": p_chance, "results": rows}, f, indent=2)
    # the trained samples' length in the evaluated segments (the trained number of segments at the trained T)
    mark = math.ceil(trained["sample_len"] / T) if trained["sample_len"] else trained["num_segments"]
    fig = plot(rows, task_name, p_chance, vocab, mark, T, trained["sample_len"])
    fig.savefig(png_path, dpi=100)
    print(f"wrote {os.path.normpath(json_path)} and {os.path.normpath(png_path)}", file=sys.stderr)
    return 0


def _criterion_cfg():
    from omegaconf import OmegaConf

    return OmegaConf.create({"_name": "rmt_cross_entropy", "checkpoint_segments": False})


def plot(rows, task, p_chance, vocab, trained_segments, seg_len, trained_tokens=None):
    """Accuracy against segments per sample (of seg_len tokens), with the chance level, the no-memory bound and
    the trained length (`trained_segments` of seg_len, `trained_tokens` tokens) marked; returns the Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["segments"] for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    ax.plot(x, [r["acc"] for r in rows], marker="o", label="token accuracy")
    ax.plot(x, [r["em"] for r in rows], marker="s", label="exact match")
    ax.plot(x, [r["no_memory_bound"] for r in rows], ls=":", marker=".", c="C2",
            label="no-memory bound (token accuracy)")
    ax.axhline(p_chance, ls="--", c="gray", label=f"chance: uniform over {vocab} symbols ({p_chance:.0f}%)")
    ticks = sorted(set(x + ([trained_segments] if trained_segments else [])))
    if trained_segments:
        tokens = f", {trained_tokens} tokens" if trained_tokens else ""
        ax.axvline(trained_segments, ls="-.", c="C3", label=f"trained length ({trained_segments} segments{tokens})")
        ax.text(trained_segments, 99, " trained length", color="C3", fontsize=8, ha="left", va="top")
    ax.set(xlabel=f"segments per sample (segment length {seg_len})", ylabel="test %, greedy decoding",
           ylim=(0, 101), xlim=(ticks[0] - 0.5, ticks[-1] + 0.5), title=f"{task}: extrapolation to longer inputs")
    ax.set_xticks(ticks)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
