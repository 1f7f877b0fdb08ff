"""Training throughput at equal model size and segment length (issue 5, figure 1).

    python benchmarks/throughput.py [--quick] [--out results.json]

Side by side in one run (absolute times on a shared CPU are noise; ratios are what to read): the no-memory
backbone, RMT with M memory tokens at K=0 and K=2 (block mode), Transformer-XL with a cache as long as the
segment, and fairseq's stock transformer_lm of the same size. Each measures tokens/s of full training steps
(forward, backward, Adam) on random tokens, reports the ratio to the no-memory backbone (ideal for RMT:
T / (T + 2M)) and model FLOP/s (6 x non-embedding parameters per token plus attention) as a fraction of the
fp32 GEMM FLOP/s measured in the same run.
"""

import argparse
import json
import os
import sys
import time

import torch

from rmt_fairseq.provenance import provenance  # noqa: E402


def gemm_flops(n=1024, reps=10):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 steps (CI smoke test)")
    ap.add_argument("--out", default="benchmarks/results/throughput.json")
    a = ap.parse_args(argv)
    from common import rmt_model, vocab_task
    from fairseq.models.transformer_lm import TransformerLanguageModel, TransformerLanguageModelConfig

    from rmt_fairseq.modules.recurrence import RecurrentState

    # torch threads: rmt_fairseq/threads.py's rule, applied when the model is built (OMP_NUM_THREADS chooses)
    L, C, H, T, B, M, V, steps = (2, 64, 2, 32, 2, 4, 200, 2) if a.quick else (4, 256, 4, 128, 8, 10, 10000, 6)
    task = vocab_task(V)

    def rmt(mem_tokens, mem_len):
        return rmt_model(task, L, C, H, mem_tokens=mem_tokens, mem_len=mem_len, tokens_per_sample=T,
                         share_decoder_input_output_embed=True)

    def stock():
        torch.manual_seed(0)
        cfg = TransformerLanguageModelConfig(decoder_layers=L, decoder_embed_dim=C, decoder_attention_heads=H,
                                             decoder_ffn_embed_dim=4 * C, dropout=0.0, tokens_per_sample=T,
                                             max_target_positions=T, share_decoder_input_output_embed=True,
                                             decoder_input_dim=C, decoder_output_dim=C)
        return TransformerLanguageModel.build_model(cfg, task)

    runs = [("no_memory", rmt(0, 0), 0), ("rmt_K0", rmt(M, 0), 0), ("rmt_K2", rmt(M, 0), 2),
            ("transformer_xl", rmt(0, T), 0), ("fairseq_transformer_lm", stock(), 0)]
    peak = gemm_flops()
    rows = []
    for name, model, K in runs:
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        x = torch.randint(4, V, (B, (K + 1) * T))

        def step():
            opt.zero_grad()
            if name == "fairseq_transformer_lm":
                out, _ = model(x[:, :T])
                loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), x[:, :T].flatten())
            else:
                losses, _ = model(x, target=x, rmt_state=RecurrentState(), segment_len=T, bptt_unroll=K)
                loss = losses.sum() / x.numel()
            loss.backward()
            opt.step()

        step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        dt = (time.perf_counter() - t0) / steps
        tokens = B * (K + 1) * T if name != "fairseq_transformer_lm" else B * T
        n_params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
        ctx = T + (2 * M if name.startswith("rmt") else 0) + (T if name == "transformer_xl" else 0)
        flops_per_token = 6 * n_params + 6 * L * ctx * C  # dense + attention (fwd + bwd)
        rows.append({"model": name, "tokens_per_s": tokens / dt, "model_flops_fraction_of_gemm":
                     tokens / dt * flops_per_token / peak})
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["ratio_to_no_memory"] = r["tokens_per_s"] / base
        print(f"{r['model']:<24}{r['tokens_per_s']:>12.0f} tok/s  x{r['ratio_to_no_memory']:.3f}  "
              f"{100 * r['model_flops_fraction_of_gemm']:5.1f}% of GEMM FLOP/s", flush=True)
    ideal = T / (T + 2 * M)
    print(f"ideal RMT ratio T/(T+2M) = {ideal:.3f}; fp32 GEMM {peak / 1e9:.1f} GFLOP/s")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"size": dict(layers=L, dim=C, heads=H, T=T, B=B, M=M, vocab=V), "gemm_flops": peak,
                   "ideal_rmt_ratio": ideal, "rows": rows, "provenance": provenance()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
