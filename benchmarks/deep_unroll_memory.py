"""Deep BPTT unrolls: peak memory and time per segment against K, with and without --checkpoint-segments.

    python benchmarks/deep_unroll_memory.py [--quick] [--out results.json] [--png plot.png]

Each configuration runs in a fresh subprocess (so peaks do not mix): a model is built, then an
update of K+1 segments runs (block mode: the whole unroll stays in the graph) with its backward. Peak memory
is the growth of the process's peak RSS (`resource.getrusage`, CPU) during the first update over the resident
size before it; time is taken on the second update. Prints a table, writes JSON.

Each configuration runs twice. glibc's malloc raises its mmap threshold dynamically after large blocks are
freed, then serves later large tensors from heap arenas it does not give back to the system, so with the
default allocator the RSS peak also counts freed-but-retained memory, which grows with the number of
segments recomputed. The run with MALLOC_MMAP_THRESHOLD_=131072 (a fixed threshold: every large tensor is
its own mapping, returned when freed) measures the memory the tensors need: that is `peak_mb`. The default
allocator's figure is kept as `peak_mb_default_malloc`, and time per segment comes from that run (mmap per
allocation is slower). On a GPU, torch.cuda.max_memory_allocated measures the same quantity as `peak_mb`.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from rmt_fairseq.provenance import provenance  # noqa: E402


def _current_rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def one(K, ckpt, layers, dim, T, B, M):
    import torch
    from common import rmt_model, vocab_task

    from rmt_fairseq.modules.recurrence import RecurrentState

    # torch threads: rmt_fairseq/threads.py's rule, applied when the model is built (OMP_NUM_THREADS chooses)
    model = rmt_model(vocab_task(1000), layers, dim, mem_tokens=M, tokens_per_sample=T).train()
    x = torch.randint(4, 1000, (B, (K + 1) * T))

    def step():
        losses, _ = model(x, target=x, rmt_state=RecurrentState(), segment_len=T, bptt_unroll=K,
                          checkpoint_segments=ckpt)
        losses.sum().backward()
        model.zero_grad(set_to_none=False)

    base = _current_rss_kb()  # model, data and nothing else yet
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the first update's peak: activations + grads
    t0 = time.perf_counter()
    step()  # timed on the second update (warm allocator)
    dt = time.perf_counter() - t0
    return {"K": K, "checkpoint_segments": ckpt, "peak_mb": (peak - base) / 1024, "rss_mb": peak / 1024,
            "sec_per_segment": dt / (K + 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, K in 1,2 (CI smoke test)")
    ap.add_argument("--out", default="benchmarks/results/deep_unroll_memory.json")
    ap.add_argument("--png", default=None, help="also draw memory and time against K")
    ap.add_argument("--ks", default=None, help="comma-separated K values (default 1,2,4,8,16; quick: 1,2)")
    ap.add_argument("--single", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    size = dict(layers=2, dim=32, T=16, B=2, M=4) if a.quick else dict(layers=4, dim=256, T=128, B=8, M=10)
    if a.single:
        K, ckpt = a.single.split(",")
        print(json.dumps(one(int(K), ckpt == "1", **size)))
        return 0
    Ks = [int(k) for k in a.ks.split(",")] if a.ks else ([1, 2] if a.quick else [1, 2, 4, 8, 16])
    rows = []
    for ckpt in (False, True):
        for K in Ks:
            cmd = [sys.executable, __file__, "--single", f"{K},{int(ckpt)}"] + (["--quick"] if a.quick else [])
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
            default = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                                 .stdout.strip().splitlines()[-1])
            fixed = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True,
                                              env=dict(env, MALLOC_MMAP_THRESHOLD_="131072"))
                               .stdout.strip().splitlines()[-1])
            r = dict(default, peak_mb=fixed["peak_mb"], rss_mb=fixed["rss_mb"],
                     peak_mb_default_malloc=default["peak_mb"], rss_mb_default_malloc=default["rss_mb"])
            rows.append(r)
            print(f"K={K:<3} checkpoint_segments={str(ckpt):<5} peak +{r['peak_mb']:8.1f} MB "
                  f"(default malloc +{r['peak_mb_default_malloc']:7.1f} MB)  "
                  f"{1000 * r['sec_per_segment']:8.1f} ms/segment", flush=True)
    by = {(r["K"], r["checkpoint_segments"]): r for r in rows}
    k1, kmax = Ks[0], Ks[-1]
    summary = {
        "memory_ratio_kmax_vs_k1_with_ckpt": by[(kmax, True)]["peak_mb"] / max(by[(k1, True)]["peak_mb"], 1e-9),
        "memory_ratio_kmax_vs_k1_without_ckpt": by[(kmax, False)]["peak_mb"] / max(by[(k1, False)]["peak_mb"], 1e-9),
        "memory_ratio_kmax_vs_k1_with_ckpt_default_malloc": by[(kmax, True)]["peak_mb_default_malloc"]
        / max(by[(k1, True)]["peak_mb_default_malloc"], 1e-9),
        "time_per_segment_ratio_kmax_vs_k1_with_ckpt": by[(kmax, True)]["sec_per_segment"]
        / by[(k1, True)]["sec_per_segment"],
    }
    print(json.dumps(summary, indent=2))
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"size": size, "rows": rows, "summary": summary, "provenance": provenance()}, f, indent=2)
    if a.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (m, t) = plt.subplots(1, 2, figsize=(9, 3.5))
        for ckpt in (False, True):
            rs = [by[(K, ckpt)] for K in Ks]
            lab = "with --checkpoint-segments" if ckpt else "without"
            m.plot(Ks, [r["peak_mb"] for r in rs], marker="o", label=lab)
            t.plot(Ks, [1000 * r["sec_per_segment"] for r in rs], marker="o", label=lab)
        m.plot(Ks, [by[(K, True)]["peak_mb_default_malloc"] for K in Ks], marker="x", linestyle="--",
               label="with, RSS under default malloc")
        m.set(xlabel="K (BPTT unroll)", ylabel="peak memory growth (MB)")
        t.set(xlabel="K (BPTT unroll)", ylabel="ms per segment")
        m.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(a.png, dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
