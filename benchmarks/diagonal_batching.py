"""Diagonal batching (Sivtsov et al. 2025, arXiv 2506.05229) against the sequential schedule: evaluation tokens/s
of a 12-layer ARMT over 16K .. 1M tokens on this CPU, and how far the two schedules' losses differ.

    python benchmarks/diagonal_batching.py [--quick] [--lengths 16384,...] [--out FILE.json]

The model (rmt_lm with --associative-memory: 12 layers, C 128, 4 heads, FFN 512, 16 memory tokens, d_mem 32,
segments of 128 tokens, one stream) evaluates a random token stream without gradients, --eval-segments-per-batch
segments per call (64: what fairseq-eval-lm --eval-segments-per-batch 64 hands the model), the associative state
carried from call to call. Its write projections are drawn N(0, 0.02) so that the memory holds something. Each
(length, schedule) runs in a fresh process with torch's default threads; the figures are tokens/s, peak RSS and
the total NLL (nats), whose relative difference between the schedules is printed. Results: JSON and a PNG.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rmt_fairseq.provenance import write_results  # noqa: E402

SIZE = dict(layers=12, dim=128, heads=4, mem_tokens=16, d_mem=32, T=128, per_call=64)


def one(n_tokens: int, schedule: str, size: dict) -> dict:
    import torch
    from common import rmt_model, vocab_task

    from rmt_fairseq.modules.recurrence import RecurrentState

    model = rmt_model(vocab_task(256), size["layers"], size["dim"], size["heads"], mem_tokens=size["mem_tokens"],
                      associative_memory=True, d_mem=size["d_mem"], tokens_per_sample=size["T"]).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.decoder.assoc_layers:
            block.v_proj.weight.copy_(torch.randn(block.v_proj.weight.shape, generator=gen) * 0.02)
    T, chunk = size["T"], size["T"] * size["per_call"]
    stream = torch.randint(4, 260, (1, 16 * chunk + 1), generator=gen)  # reused: generating 1M tokens is not the point
    model.decoder.inference_schedule = schedule  # what --inference-schedule sets
    state, nll, done = RecurrentState(), 0.0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        while done < n_tokens:
            n = min(chunk, n_tokens - done)
            at = done % (16 * chunk)
            src, tgt = stream[:, at: at + n], stream[:, at + 1: at + n + 1]
            losses, _ = model(src, target=tgt, rmt_state=state, segment_len=T)
            nll += float(losses.sum())
            done += n
    dt = time.perf_counter() - t0
    return {"tokens": done, "schedule": schedule, "seconds": dt, "tokens_per_s": done / dt, "nll": nll,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for schedule, marker in (("sequential", "o"), ("diagonal", "s")):
        pts = [(r["tokens"], r["tokens_per_s"]) for r in rows if r["schedule"] == schedule]
        ax.plot(*zip(*pts), marker=marker, label=schedule)
    ax.set_xscale("log")
    ax.set_xlabel("tokens evaluated")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"ARMT {SIZE['layers']} layers, C {SIZE['dim']}, segments of {SIZE['T']}: CPU eval")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4K and 8K tokens (the CI smoke test)")
    ap.add_argument("--lengths", default="16384,65536,262144,1048576", help="comma-separated token counts")
    ap.add_argument("--out", default="benchmarks/results/diagonal_batching.json")
    ap.add_argument("--single", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.single:
        n, schedule = a.single.split(":")
        print(json.dumps(one(int(n), schedule, SIZE)))
        return 0
    lengths = [4096, 8192] if a.quick else [int(x) for x in a.lengths.split(",")]
    rows, summary = [], []
    for n in lengths:
        pair = {}
        for schedule in ("sequential", "diagonal"):
            p = subprocess.run([sys.executable, __file__, "--single", f"{n}:{schedule}"], capture_output=True,
                               text=True)
            if p.returncode != 0:
                sys.stderr.write(p.stderr[-3000:])
                raise SystemExit(f"error: the {schedule} run of {n} tokens failed (exit status {p.returncode})")
            pair[schedule] = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append(pair[schedule])
        s, d = pair["sequential"], pair["diagonal"]
        summary.append({"tokens": n, "sequential_tokens_per_s": s["tokens_per_s"],
                        "diagonal_tokens_per_s": d["tokens_per_s"], "speedup": d["tokens_per_s"] / s["tokens_per_s"],
                        "nll_relative_difference": abs(d["nll"] - s["nll"]) / abs(s["nll"]),
                        "peak_rss_mb": {"sequential": s["peak_rss_mb"], "diagonal": d["peak_rss_mb"]}})
        r = summary[-1]
        print(f"{n:>9} tokens  sequential {r['sequential_tokens_per_s']:8.0f} tok/s  diagonal "
              f"{r['diagonal_tokens_per_s']:8.0f} tok/s  x{r['speedup']:.2f}  NLL rel. diff "
              f"{r['nll_relative_difference']:.1e}  RSS {s['peak_rss_mb']:.0f}/{d['peak_rss_mb']:.0f} MB", flush=True)
    result = {"size": SIZE, "rows": rows, "summary": summary}
    write_results(a.out, result)
    plot(rows, os.path.splitext(a.out)[0] + ".png")
    print(f"wrote {a.out} and {os.path.splitext(a.out)[0]}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
