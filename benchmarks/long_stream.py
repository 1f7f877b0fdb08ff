"""Long-stream evaluation: time per token and peak memory when streaming 16K .. 10M tokens through a small
RMT with memory carried across every segment (issue 5, figure 2; "Scaling Transformer to 1M tokens").

    python benchmarks/long_stream.py [--quick] [--out results.json]

Each length runs in a fresh subprocess (no_grad, the segment loop one segment at a time, as eval does);
peak memory is the process's peak RSS. Target: time per token at the longest length within 10% of 16K and
peak memory within 5% (no growth with length).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from rmt_fairseq.provenance import provenance  # noqa: E402


def one(n_tokens, T, layers, dim, M):
    import torch
    from common import rmt_model, vocab_task

    from rmt_fairseq.modules.recurrence import RecurrentState

    # torch threads: rmt_fairseq/threads.py's rule, applied when the model is built (OMP_NUM_THREADS chooses)
    model = rmt_model(vocab_task(256), layers, dim, mem_tokens=M, tokens_per_sample=T).eval()
    state = RecurrentState()
    gen = torch.Generator().manual_seed(0)
    block = torch.randint(4, 260, (1, 64 * T), generator=gen)  # reused: generating 10M tokens is not the point
    done = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        while done < n_tokens:
            seg = block[:, (done // T) % 64 * T : ((done // T) % 64 + 1) * T]
            model(seg, target=seg, rmt_state=state, segment_len=T)
            done += T
    dt = time.perf_counter() - t0
    return {"tokens": done, "us_per_token": 1e6 * dt / done,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16K and 128K tokens (CI smoke test)")
    ap.add_argument("--out", default="benchmarks/results/long_stream.json")
    ap.add_argument("--single", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    size = dict(T=128, layers=2, dim=64, M=10)
    if a.single:
        print(json.dumps(one(a.single, **size)))
        return 0
    lengths = [16_000, 128_000] if a.quick else [16_000, 128_000, 1_000_000, 10_000_000]
    rows = []
    for n in lengths:
        p = subprocess.run([sys.executable, __file__, "--single", str(n)], capture_output=True, text=True, check=True)
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['tokens']:>10} tokens  {r['us_per_token']:8.2f} us/token  peak RSS {r['peak_rss_mb']:8.1f} MB",
              flush=True)
    summary = {"time_per_token_longest_vs_16k": rows[-1]["us_per_token"] / rows[0]["us_per_token"],
               "peak_rss_longest_vs_16k": rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]}
    print(json.dumps(summary, indent=2))
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"size": size, "rows": rows, "summary": summary, "provenance": provenance()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
