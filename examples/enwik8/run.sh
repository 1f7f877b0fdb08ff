#!/usr/bin/env bash
# The enwik8 rows of the RMT paper (arXiv 2207.06881v2, appendix Table 4), one command each.
#
#   examples/enwik8/run.sh list                  every row: its flags and the paper's test bits per character
#   examples/enwik8/run.sh ROW [FLAGS...]        train one row (FLAGS go to the trainer, e.g. --seed 2)
#   examples/enwik8/run.sh eval ROW [FLAGS...]   test bpc of the row's checkpoint (fairseq-eval-lm "Loss (base 2)")
#   examples/enwik8/run.sh eval-xl ROW [FLAGS...]  rows with a cache: Transformer-XL's own evaluation (run_enwik8_base.sh eval)
#
# Training setup of the authors' runs (LM-RMT experiment_results/results_wt103_enwik8_all_parameters.csv, which is
# Transformer-XL base's enwik8 setup): Adam, lr 2.5e-4, cosine decay to 0 over the run, no warmup, gradient
# clipping 0.25, 400k updates, 22 streams of segment 512 per update, 64 streams of segment 128. Every update
# advances each stream by one segment; BPTT-K rows recompute the K segments before it (--bptt-mode sliding, the
# authors' scheme); rows without recurrent memory use --bptt-unroll 0.
#
# Machine settings (environment): DATA (default data-bin/enwik8), SAVE (default checkpoints/enwik8/ROW),
# GPUS per node (default 2: the paper's 2 x A100 80GB), LAUNCHER=fairseq|deepspeed (default fairseq),
# HOSTFILE (deepspeed on several nodes: "host slots=N" per line), NODES (default: the hostfile's lines, else 1),
# DS_CONFIG (default ds_configs/zero2.json), CKPT (eval: default SAVE/checkpoint_best.pt),
# DRY_RUN=1 (print the command instead of running it). The streams of a row are split over GPUS x NODES ranks.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)

# ROW  T  streams  updates  model flags  | paper test bpc (± std over runs) | paper table
ROWS='
xl-l512-t512      512  22 400000 --arch transformer_xl_enwik8 --mem-len 512 --bptt-unroll 0 | 1.071 | 4
baseline-t512     512  22 400000 --arch rmt_enwik8 --mem-tokens 0 --bptt-unroll 0 | n/a (not in Table 4) | -
baseline-t128     128  64 400000 --arch rmt_enwik8 --mem-tokens 0 --bptt-unroll 0 | n/a (not in Table 4) | -
xl-l200-t128      128  64 400000 --arch transformer_xl_enwik8 --mem-len 200 --bptt-unroll 0 | 1.140 | 4
xl-l100-t128      128  64 400000 --arch transformer_xl_enwik8 --mem-len 100 --bptt-unroll 0 | 1.178 | 4
xl-l75-t128       128  64 400000 --arch transformer_xl_enwik8 --mem-len 75 --bptt-unroll 0 | 1.196 | 4
xl-l40-t128       128  64 400000 --arch transformer_xl_enwik8 --mem-len 40 --bptt-unroll 0 | 1.230 ± 0.001 | 4
xl-l20-t128       128  64 400000 --arch transformer_xl_enwik8 --mem-len 20 --bptt-unroll 0 | 1.261 | 4
xl-l10-t128       128  64 400000 --arch transformer_xl_enwik8 --mem-len 10 --bptt-unroll 0 | 1.283 ± 0.001 | 4
rmt-m5-k1-t128    128  64 400000 --arch rmt_enwik8 --mem-tokens 5 --bptt-unroll 1 --bptt-mode sliding | 1.241 ± 0.002 | 4
rmt-m5-k2-t128    128  64 400000 --arch rmt_enwik8 --mem-tokens 5 --bptt-unroll 2 --bptt-mode sliding | 1.231 ± 0.002 | 4
rmt-m10-k1-t128   128  64 400000 --arch rmt_enwik8 --mem-tokens 10 --bptt-unroll 1 --bptt-mode sliding | 1.240 ± 0.006 | 4
rmt-m10-k2-t128   128  64 400000 --arch rmt_enwik8 --mem-tokens 10 --bptt-unroll 2 --bptt-mode sliding | 1.228 ± 0.003 | 4
rmt-m20-k0-t128   128  64 400000 --arch rmt_enwik8 --mem-tokens 20 --bptt-unroll 0 | 1.301 | 4
rmt-m20-k1-t128   128  64 400000 --arch rmt_enwik8 --mem-tokens 20 --bptt-unroll 1 --bptt-mode sliding | 1.229 | 4
rmt-m20-k2-t128   128  64 400000 --arch rmt_enwik8 --mem-tokens 20 --bptt-unroll 2 --bptt-mode sliding | 1.222 | 4
'
# Transformer-XL base's enwik8 optimisation (Dai et al. 2019), as the authors ran it
OPTIM=(--optimizer adam --lr 2.5e-4 --lr-scheduler cosine --warmup-updates 0 --clip-norm 0.25)
EVAL_STREAMS=10  # Transformer-XL's and LM-RMT's eval_batch_size
XL_EVAL='80 2100 820'  # eval-xl: Transformer-XL's run_enwik8_base.sh eval: tgt_len, mem_len, clamp_len (+ same_length)
EVAL_T=128  # the authors' eval_tgt_len for every enwik8 run (their results dump)
DEFAULT_DATA=data-bin/enwik8
DEFAULT_SAVE_ROOT=checkpoints/enwik8

METRIC=bpc
PREPARE=examples/enwik8/prepare.sh
# eval: one token per byte, so fairseq-eval-lm's "Loss (base 2)" is the bpc

source "$REPO/examples/paper_rows.sh" "$@"
