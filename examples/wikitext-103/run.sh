#!/usr/bin/env bash
# The WikiText-103 rows of the RMT paper (arXiv 2207.06881v2, Table 2 and appendix Table 5), one command each.
#
#   examples/wikitext-103/run.sh list                  every row: its flags and the paper's test perplexity
#   examples/wikitext-103/run.sh ROW [FLAGS...]        train one row (FLAGS go to the trainer, e.g. --seed 2)
#   examples/wikitext-103/run.sh eval ROW [FLAGS...]   test perplexity of the row's checkpoint (fairseq-eval-lm)
#   examples/wikitext-103/run.sh eval-xl ROW [FLAGS...]  rows with a cache: Transformer-XL's own evaluation (run_wt103_base.sh eval)
#
# Training setup of the authors' runs (LM-RMT experiment_results/results_wt103_enwik8_all_parameters.csv, which is
# Transformer-XL base's WikiText-103 setup): Adam, lr 2.5e-4, cosine decay to 0 over the run, no warmup, gradient
# clipping 0.25, 200k updates ("2x" rows 400k), 60 streams of segment 150 per update, 128 streams of segment 50.
# Every update advances each stream by one segment; BPTT-K rows recompute the K segments before it
# (--bptt-mode sliding, the authors' scheme); rows without recurrent memory use --bptt-unroll 0.
#
# Machine settings (environment): DATA (default data-bin/wikitext-103), SAVE (default checkpoints/wt103/ROW),
# GPUS per node (default 2: the paper's 2 x A100 80GB), LAUNCHER=fairseq|deepspeed (default fairseq),
# HOSTFILE (deepspeed on several nodes: "host slots=N" per line), NODES (default: the hostfile's lines, else 1),
# DS_CONFIG (default ds_configs/zero2.json), CKPT (eval: default SAVE/checkpoint_best.pt),
# DRY_RUN=1 (print the command instead of running it). The streams of a row are split over GPUS x NODES ranks.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)

# ROW  T  streams  updates  model flags  | paper test ppl (± std over runs) | paper table(s)
ROWS='
baseline-t150             150  60 200000 --arch rmt_wt103 --mem-tokens 0 --bptt-unroll 0 | 29.95 ± 0.15 | 2, 5
mt-m10-t150               150  60 200000 --arch rmt_wt103 --memory-layout mt --mem-tokens 10 --bptt-unroll 0 | 29.63 ± 0.06 | 2, 5
mt-m25-t150               150  60 200000 --arch rmt_wt103 --memory-layout mt --mem-tokens 25 --bptt-unroll 0 | 29.67 ± 0.03 | 5
mt-m75-t150               150  60 200000 --arch rmt_wt103 --memory-layout mt --mem-tokens 75 --bptt-unroll 0 | 29.69 ± 0.02 | 5
mt-m150-t150              150  60 200000 --arch rmt_wt103 --memory-layout mt --mem-tokens 150 --bptt-unroll 0 | 29.82 ± 0.35 | 5
xl-l150-t150              150  60 200000 --arch transformer_xl_wt103 --mem-len 150 --bptt-unroll 0 | 24.12 ± 0.05 | 2, 5
xl-l150-t150-2x           150  60 400000 --arch transformer_xl_wt103 --mem-len 150 --bptt-unroll 0 | 24.67 | 5
xl-l75-t150               150  60 200000 --arch transformer_xl_wt103 --mem-len 75 --bptt-unroll 0 | 24.68 ± 0.01 | 2, 5
xl-l75-t150-2x            150  60 400000 --arch transformer_xl_wt103 --mem-len 75 --bptt-unroll 0 | 24.49 | 5
xl-l25-t150               150  60 200000 --arch transformer_xl_wt103 --mem-len 25 --bptt-unroll 0 | 25.57 ± 0.02 | 2, 5
rmt-m10-k0-t150           150  60 200000 --arch rmt_wt103 --mem-tokens 10 --bptt-unroll 0 | 26.85 ± 0.02 | 5
rmt-m10-k1-t150           150  60 200000 --arch rmt_wt103 --mem-tokens 10 --bptt-unroll 1 --bptt-mode sliding | 25.92 ± 1.07 | 5
rmt-m10-k2-t150           150  60 200000 --arch rmt_wt103 --mem-tokens 10 --bptt-unroll 2 --bptt-mode sliding | 25.32 ± 0.61 | 5
rmt-m10-k3-t150           150  60 200000 --arch rmt_wt103 --mem-tokens 10 --bptt-unroll 3 --bptt-mode sliding | 25.04 ± 0.07 | 2, 5
rmt-m25-k0-t150           150  60 200000 --arch rmt_wt103 --mem-tokens 25 --bptt-unroll 0 | 29.73 | 5
rmt-m25-k1-t150           150  60 200000 --arch rmt_wt103 --mem-tokens 25 --bptt-unroll 1 --bptt-mode sliding | 24.91 | 5
rmt-m25-k2-t150           150  60 200000 --arch rmt_wt103 --mem-tokens 25 --bptt-unroll 2 --bptt-mode sliding | 24.85 ± 0.31 | 2, 5
xlrmt-l70-m5-k3-t150      150  60 200000 --arch rmt_wt103 --mem-len 70 --mem-tokens 5 --bptt-unroll 3 --bptt-mode sliding | 24.53 | 5
xlrmt-l75-m5-k3-t150      150  60 200000 --arch rmt_wt103 --mem-len 75 --mem-tokens 5 --bptt-unroll 3 --bptt-mode sliding | 24.47 ± 0.05 | 2, 5
xlrmt-l140-m10-k0-t150    150  60 200000 --arch rmt_wt103 --mem-len 140 --mem-tokens 10 --bptt-unroll 0 | 24.25 | 5
xlrmt-l150-m10-k1-t150    150  60 200000 --arch rmt_wt103 --mem-len 150 --mem-tokens 10 --bptt-unroll 1 --bptt-mode sliding | 24.30 ± 0.09 | 5
xlrmt-l150-m10-k3-t150-2x 150  60 400000 --arch rmt_wt103 --mem-len 150 --mem-tokens 10 --bptt-unroll 3 --bptt-mode sliding | 23.99 ± 0.09 | 2, 5
baseline-t50               50 128 200000 --arch rmt_wt103 --mem-tokens 0 --bptt-unroll 0 | 39.05 ± 0.01 | 2, 5
xl-l200-t50                50 128 200000 --arch transformer_xl_wt103 --mem-len 200 --bptt-unroll 0 | 25.14 | 5
xl-l100-t50                50 128 200000 --arch transformer_xl_wt103 --mem-len 100 --bptt-unroll 0 | 25.66 ± 0.01 | 2, 5
xl-l50-t50                 50 128 200000 --arch transformer_xl_wt103 --mem-len 50 --bptt-unroll 0 | 26.54 ± 0.01 | 2, 5
xl-l25-t50                 50 128 200000 --arch transformer_xl_wt103 --mem-len 25 --bptt-unroll 0 | 27.57 ± 0.09 | 2, 5
xl-l10-t50                 50 128 200000 --arch transformer_xl_wt103 --mem-len 10 --bptt-unroll 0 | 28.98 ± 0.11 | 2, 5
xl-l5-t50                  50 128 200000 --arch transformer_xl_wt103 --mem-len 5 --bptt-unroll 0 | 30.06 ± 0.07 | 5
xl-l1-t50                  50 128 200000 --arch transformer_xl_wt103 --mem-len 1 --bptt-unroll 0 | 32.35 ± 0.03 | 5
rmt-m1-k0-t50              50 128 200000 --arch rmt_wt103 --mem-tokens 1 --bptt-unroll 0 | 31.33 ± 1.26 | 5
rmt-m1-k1-t50              50 128 200000 --arch rmt_wt103 --mem-tokens 1 --bptt-unroll 1 --bptt-mode sliding | 28.71 ± 0.03 | 2, 5
rmt-m1-k2-t50              50 128 200000 --arch rmt_wt103 --mem-tokens 1 --bptt-unroll 2 --bptt-mode sliding | 28.44 | 5
rmt-m1-k3-t50              50 128 200000 --arch rmt_wt103 --mem-tokens 1 --bptt-unroll 3 --bptt-mode sliding | 28.40 ± 0.03 | 5
rmt-m5-k0-t50              50 128 200000 --arch rmt_wt103 --mem-tokens 5 --bptt-unroll 0 | 30.32 ± 0.18 | 5
rmt-m5-k1-t50              50 128 200000 --arch rmt_wt103 --mem-tokens 5 --bptt-unroll 1 --bptt-mode sliding | 27.05 ± 0.20 | 5
rmt-m5-k2-t50              50 128 200000 --arch rmt_wt103 --mem-tokens 5 --bptt-unroll 2 --bptt-mode sliding | 26.83 ± 0.18 | 5
rmt-m5-k3-t50              50 128 200000 --arch rmt_wt103 --mem-tokens 5 --bptt-unroll 3 --bptt-mode sliding | 26.75 ± 0.26 | 5
rmt-m5-k4-t50              50 128 200000 --arch rmt_wt103 --mem-tokens 5 --bptt-unroll 4 --bptt-mode sliding | 26.67 ± 0.03 | 5
rmt-m10-k0-t50             50 128 200000 --arch rmt_wt103 --mem-tokens 10 --bptt-unroll 0 | 30.69 ± 0.01 | 5
rmt-m10-k1-t50             50 128 200000 --arch rmt_wt103 --mem-tokens 10 --bptt-unroll 1 --bptt-mode sliding | 27.95 ± 1.32 | 5
rmt-m10-k2-t50             50 128 200000 --arch rmt_wt103 --mem-tokens 10 --bptt-unroll 2 --bptt-mode sliding | 26.62 ± 0.34 | 5
rmt-m10-k3-t50             50 128 200000 --arch rmt_wt103 --mem-tokens 10 --bptt-unroll 3 --bptt-mode sliding | 26.37 ± 0.01 | 2, 5
rmt-m10-k4-t50             50 128 200000 --arch rmt_wt103 --mem-tokens 10 --bptt-unroll 4 --bptt-mode sliding | 26.25 ± 0.19 | 5
rmt-m25-k0-t50             50 128 200000 --arch rmt_wt103 --mem-tokens 25 --bptt-unroll 0 | 29.75 | 5
rmt-m25-k1-t50             50 128 200000 --arch rmt_wt103 --mem-tokens 25 --bptt-unroll 1 --bptt-mode sliding | 26.32 | 5
rmt-m25-k2-t50             50 128 200000 --arch rmt_wt103 --mem-tokens 25 --bptt-unroll 2 --bptt-mode sliding | 27.31 | 5
rmt-m50-k0-t50             50 128 200000 --arch rmt_wt103 --mem-tokens 50 --bptt-unroll 0 | 29.75 | 5
rmt-m50-k1-t50             50 128 200000 --arch rmt_wt103 --mem-tokens 50 --bptt-unroll 1 --bptt-mode sliding | 26.03 | 5
'
# Transformer-XL base's WikiText-103 optimisation (Dai et al. 2019), as the authors ran it
OPTIM=(--optimizer adam --lr 2.5e-4 --lr-scheduler cosine --warmup-updates 0 --clip-norm 0.25)
EVAL_STREAMS=10  # Transformer-XL's and LM-RMT's eval_batch_size
XL_EVAL='64 640 400'  # eval-xl: Transformer-XL's run_wt103_base.sh eval: tgt_len, mem_len, clamp_len (+ same_length)
DEFAULT_DATA=data-bin/wikitext-103
DEFAULT_SAVE_ROOT=checkpoints/wt103

METRIC=ppl
PREPARE=examples/wikitext-103/prepare.sh

source "$REPO/examples/paper_rows.sh" "$@"
