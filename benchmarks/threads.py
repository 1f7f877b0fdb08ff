"""Intra-op threads on a shared CPU (issue 27): what rmt_fairseq/threads.py's rule rests on.

    python benchmarks/threads.py [--quick] [--out benchmarks/results/threads.json]

For rmt_lm models from the demo's size (rmt_tiny's shape) to a few tens of millions of parameters, the time of
one training step (the model's forward with targets, backward, Adam) with 1 thread and with all the CPUs this
process may use, alone and beside a busy job (a second process doing 512 x 512 matrix products with torch's
default threads, as another user's torch job would). Prints a table and writes JSON with the rule's threshold
(`rmt_fairseq.threads.MIN_PARAMETERS_FOR_MORE_THREADS`) and the threads it picks for each size.
"""

import argparse
import sys
import time

import torch

from rmt_fairseq import threads as rule
from rmt_fairseq.provenance import provenance

# (name, layers, C, heads, FFN, streams B, segment T): rmt_tiny as the demo trains it, then larger
SIZES = [("rmt_tiny (demo)", 2, 64, 2, 128, 32, 11), ("4 x 128", 4, 128, 4, 512, 16, 32),
         ("4 x 256", 4, 256, 4, 1024, 8, 64), ("8 x 512", 8, 512, 8, 2048, 8, 128)]


def step_seconds(model, threads, B, T, seconds, vocab):
    """Mean seconds of a training step over about `seconds` of steps (one warm-up step first)."""
    torch.set_num_threads(threads)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randint(4, vocab, (B, 3 * T))

    def step():
        opt.zero_grad()
        losses, _ = model(x, target=x, segment_len=T)
        losses.sum().backward()
        opt.step()

    step()
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return (time.perf_counter() - t0) / n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the two smallest sizes, 1 s per measurement (CI)")
    ap.add_argument("--seconds", type=float, default=6.0, help="seconds of steps per measurement")
    ap.add_argument("--out", default="benchmarks/results/threads.json")
    a = ap.parse_args(argv)
    from common import busy_job, rmt_model, save_json, vocab_task

    cpus = rule.cpus_available()
    seconds = 1.0 if a.quick else a.seconds
    vocab = 1000
    task = vocab_task(vocab)
    rows = []
    print(f"{cpus} CPUs available; busy job: another process multiplying 512 x 512 matrices with torch's default "
          f"threads\n{'model':<16}{'params M':>9}{'alone 1t ms':>13}{f'alone {cpus}t ms':>13}"
          f"{'busy 1t ms':>12}{f'busy {cpus}t ms':>12}{'rule':>6}", flush=True)
    for name, L, C, H, F, B, T in SIZES[:2] if a.quick else SIZES:
        model = rmt_model(task, L, C, H, decoder_ffn_embed_dim=F, mem_tokens=8, tokens_per_sample=T)
        model.train()
        params = sum(p.numel() for p in model.parameters())
        ms = {}
        for busy in (False, True):
            with busy_job(busy):
                for t in sorted({1, cpus}):
                    ms[(busy, t)] = 1e3 * step_seconds(model, t, B, T, seconds, vocab)
        row = {"model": name, "layers": L, "dim": C, "streams": B, "segment": T, "parameters": params,
               "alone_1_thread_ms": round(ms[(False, 1)], 2), "alone_all_threads_ms": round(ms[(False, cpus)], 2),
               "busy_1_thread_ms": round(ms[(True, 1)], 2), "busy_all_threads_ms": round(ms[(True, cpus)], 2),
               "rule_threads": rule.choose(params, cpus)}
        rows.append(row)
        print(f"{name:<16}{params / 1e6:>9.2f}{row['alone_1_thread_ms']:>13.1f}{row['alone_all_threads_ms']:>13.1f}"
              f"{row['busy_1_thread_ms']:>12.1f}{row['busy_all_threads_ms']:>12.1f}{row['rule_threads']:>6}",
              flush=True)
    result = {"cpus": cpus, "threshold_parameters": rule.MIN_PARAMETERS_FOR_MORE_THREADS, "quick": a.quick,
              "seconds_per_measurement": seconds, "rows": rows, "provenance": provenance()}
    save_json(result, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
