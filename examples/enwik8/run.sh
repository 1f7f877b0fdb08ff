#!/usr/bin/env bash
# The enwik8 rows of the RMT paper (arXiv 2207.06881v2, appendix Table 4), one command each.
#
#   examples/enwik8/run.sh list                  every row: its flags and the paper's test bits per character
#   examples/enwik8/run.sh ROW [FLAGS...]        train one row (FLAGS go to the trainer, e.g. --seed 2)
#   examples/enwik8/run.sh eval ROW [FLAGS...]   test bpc of the row's checkpoint (fairseq-eval-lm "Loss (base 2)")
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
DEFAULT_DATA=data-bin/enwik8
DEFAULT_SAVE_ROOT=checkpoints/enwik8

die() { echo "error: $*" >&2; exit 2; }
run() { if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi; }

list_rows() {
  printf '%-18s %-4s %-8s %-8s %-21s %s\n' ROW T streams updates "paper bpc" "model flags"
  grep -v '^$' <<<"$ROWS" | while IFS='|' read -r spec paper _; do
    read -r name t b u flags <<<"$spec"
    printf '%-18s %-4s %-8s %-8s %-21s %s\n' "$name" "$t" "$b" "$u" "$(xargs <<<"$paper")" "$flags"
  done
}

[ $# -ge 1 ] || die "usage: $0 list | ROW [FLAGS...] | eval ROW [FLAGS...]"
if [ "$1" = list ]; then list_rows; exit 0; fi
MODE=train
if [ "$1" = eval ]; then MODE=eval; shift; [ $# -ge 1 ] || die "usage: $0 eval ROW [FLAGS...]"; fi
ROW=$1; shift
LINE=$(awk -v r="$ROW" '$1 == r' <<<"$ROWS")
[ -n "$LINE" ] || die "unknown row '$ROW' ($0 list shows the rows)"
read -r _ T STREAMS UPDATES FLAGS <<<"${LINE%%|*}"
read -ra MODEL <<<"$FLAGS"

DATA=${DATA:-$DEFAULT_DATA}
SAVE=${SAVE:-$DEFAULT_SAVE_ROOT/$ROW}
GPUS=${GPUS:-2}
LAUNCHER=${LAUNCHER:-fairseq}
HOSTFILE=${HOSTFILE:-}
if [ -n "$HOSTFILE" ]; then NODES=${NODES:-$(grep -c . "$HOSTFILE")}; else NODES=${NODES:-1}; fi
DS_CONFIG=${DS_CONFIG:-$REPO/ds_configs/zero2.json}
[ -d "$DATA" ] || [ "${DRY_RUN:-0}" = 1 ] || die "DATA=$DATA not found (run examples/enwik8/prepare.sh first)"

if [ "$MODE" = eval ]; then
  CKPT=${CKPT:-$SAVE/checkpoint_best.pt}
  if [ ! -f "$CKPT" ] && [ -f "$SAVE/latest" ]; then  # a DeepSpeed run: consolidate its last checkpoint first
    CKPT=$SAVE/fairseq_checkpoint.pt
    run rmt-deepspeed-export --checkpoint-dir "$SAVE" --out "$CKPT"
  fi
  # the whole test split, memory carried across every segment, at the training segment length; one token
  # per byte, so "Loss (base 2)" is the bpc
  run fairseq-eval-lm "$DATA" --user-dir "$REPO/user_dir" --task rmt_lm --path "$CKPT" --gen-subset test \
    --tokens-per-sample "$T" --batch-size "$EVAL_STREAMS" "$@"
  exit 0
fi

RANKS=$((GPUS * NODES))
[ $((STREAMS % RANKS)) -eq 0 ] || die "the row's $STREAMS streams do not split over GPUS x NODES = $RANKS ranks \
(--batch-size is streams per rank); use a GPU count that divides $STREAMS"
TRAIN=(--user-dir "$REPO/user_dir" --task rmt_lm --criterion rmt_cross_entropy "${MODEL[@]}"
  --tokens-per-sample "$T" --batch-size $((STREAMS / RANKS)) "${OPTIM[@]}" --max-update "$UPDATES"
  --save-dir "$SAVE" --save-interval-updates 4000 --keep-interval-updates 1 --no-epoch-checkpoints
  --log-format simple --log-interval 200)

case "$LAUNCHER" in
  fairseq)
    [ "$NODES" = 1 ] || die "LAUNCHER=fairseq runs on one node; use LAUNCHER=deepspeed with HOSTFILE for NODES=$NODES"
    run fairseq-train "$DATA" "${TRAIN[@]}" --distributed-world-size "$GPUS" "$@"
    ;;
  deepspeed)
    DS_TRAIN=$(command -v rmt-deepspeed-train) || die "rmt-deepspeed-train not found (source .venv/bin/activate)"
    LAUNCH=(deepspeed --num_gpus "$GPUS")
    if [ -n "$HOSTFILE" ]; then LAUNCH=(deepspeed --hostfile "$HOSTFILE" --num_nodes "$NODES" --num_gpus "$GPUS"); fi
    run "${LAUNCH[@]}" "$DS_TRAIN" "$DATA" "${TRAIN[@]}" --deepspeed-config "$DS_CONFIG" "$@"
    ;;
  *) die "LAUNCHER must be fairseq or deepspeed, got '$LAUNCHER'" ;;
esac
