# Shared by examples/wikitext-103/run.sh and examples/enwik8/run.sh (sourced after they set ROWS, OPTIM,
# EVAL_STREAMS, XL_EVAL, DEFAULT_DATA, DEFAULT_SAVE_ROOT, METRIC and PREPARE, and EVAL_T where the authors evaluated
# at another segment length): `list`, `ROW [FLAGS...]`, `eval ROW [FLAGS...]` (the authors' evaluation of their RMT
# runs) and `eval-xl ROW [FLAGS...]` (Transformer-XL's run_*_base.sh evaluation), launched with fairseq-train or
# deepspeed on one or several nodes.
die() { echo "error: $*" >&2; exit 2; }
run() { if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi; }

list_rows() {
  printf '%-27s %-4s %-8s %-8s %-21s %s\n' ROW T streams updates "paper $METRIC" "model flags"
  grep -v '^$' <<<"$ROWS" | while IFS='|' read -r spec paper _; do
    read -r name t b u flags <<<"$spec"
    printf '%-27s %-4s %-8s %-8s %-21s %s\n' "$name" "$t" "$b" "$u" "$(xargs <<<"$paper")" "$flags"
  done
}

[ $# -ge 1 ] || die "usage: $0 list | ROW [FLAGS...] | eval ROW [FLAGS...] | eval-xl ROW [FLAGS...]"
if [ "$1" = list ]; then list_rows; exit 0; fi
MODE=train
if [ "$1" = eval ] || [ "$1" = eval-xl ]; then MODE=$1; shift; [ $# -ge 1 ] || die "usage: $0 $MODE ROW [FLAGS...]"; fi
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
[ -d "$DATA" ] || [ "${DRY_RUN:-0}" = 1 ] || die "DATA=$DATA not found (run $PREPARE first)"

# the row's XL cache (--mem-len), 0 without one
MEM=0
for ((i = 0; i < ${#MODEL[@]}; i++)); do [ "${MODEL[$i]}" = --mem-len ] && MEM=${MODEL[$((i + 1))]}; done

if [ "$MODE" = eval ] || [ "$MODE" = eval-xl ]; then
  if [ "$MODE" = eval-xl ]; then
    # Transformer-XL's own evaluation (run_*_base.sh eval): shorter segments, a longer cache, --same_length and
    # --clamp_len, set on the trained model through --model-overrides
    [ "$MEM" -gt 0 ] || die "eval-xl is Transformer-XL's evaluation (--same_length over a cache, run_*_base.sh eval); \
row '$ROW' has no --mem-len: use eval"
    read -r XL_T XL_MEM XL_CLAMP <<<"$XL_EVAL"
    EVAL=(--tokens-per-sample "$XL_T" --model-overrides "{'mem_len': $XL_MEM, 'clamp_len': $XL_CLAMP, 'same_length': True}")
  elif [ "${EVAL_T:-$T}" != "$T" ] && [ "$MEM" -gt 0 ]; then
    # the authors' eval_tgt_len, with the cache lengthened by tgt_len - eval_tgt_len (their train.py evaluate())
    EVAL=(--tokens-per-sample "$EVAL_T" --model-overrides "{'mem_len': $((MEM + T - EVAL_T))}")
  else
    EVAL=(--tokens-per-sample "$T")  # the training segment length (see the README for rows evaluated otherwise)
  fi
  CKPT=${CKPT:-$SAVE/checkpoint_best.pt}  # fairseq-train's or, for a DeepSpeed run, its rank 0's (the same name)
  # the whole test split, memory carried across every segment
  run fairseq-eval-lm "$DATA" --user-dir "$REPO/user_dir" --task rmt_lm --path "$CKPT" --gen-subset test \
    "${EVAL[@]}" --batch-size "$EVAL_STREAMS" "$@"
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
