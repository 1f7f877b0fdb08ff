#!/usr/bin/env bash
# Train an RMT language model on a corpus made by prepare.sh, then evaluate it on the test split.
#
#   DATA=outputs/custom-corpus/shakespeare-char/bin examples/custom-corpus/run.sh [extra fairseq-train flags]
#   LAUNCHER=deepspeed GPUS=8 DATA=... examples/custom-corpus/run.sh [extra flags]
#
# Extra flags come last, so they override the defaults below (argparse keeps the last value), e.g.
# `--arch rmt_enwik8 --tokens-per-sample 512 --max-update 100000`.
# Machine settings (environment): DATA (data-bin directory, or the first argument), SAVE (checkpoint directory,
# default checkpoints/custom-corpus), LAUNCHER (fairseq or deepspeed), and for deepspeed: GPUS (per node,
# default: the visible CUDA devices, 2 processes on a CPU-only machine), HOSTFILE ("name slots=N" per line: one
# launcher reaching the other nodes over ssh), NODES (default: the hostfile's lines), MASTER_PORT, DS_CONFIG
# (default ds_configs/zero2.json). Without CUDA, --cpu is added (DeepSpeed then runs over gloo).
# EVAL_BATCH_SIZE: parallel streams the test split is cut into for fairseq-eval-lm (default 16).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
if [ -z "${DATA:-}" ] && [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then DATA=$1; shift; fi
: "${DATA:?set DATA (or give as first argument) the data-bin directory written by prepare.sh, e.g. OUT/bin}"
[ -f "$DATA/dict.txt" ] || { echo "error: $DATA/dict.txt not found: is DATA a prepare.sh OUT/bin?" >&2; exit 2; }
SAVE=${SAVE:-checkpoints/custom-corpus}
LAUNCHER=${LAUNCHER:-fairseq}
DS_CONFIG=${DS_CONFIG:-$REPO/ds_configs/zero2.json}
MASTER_PORT=${MASTER_PORT:-29500}
EVAL_BATCH_SIZE=${EVAL_BATCH_SIZE:-16}
read -r NCUDA < <(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
DEVICE=()
if [ "$NCUDA" = 0 ]; then DEVICE=(--cpu); fi
GPUS=${GPUS:-$((NCUDA > 0 ? NCUDA : 2))}
mkdir -p "$SAVE"

# rmt_tiny (2 layers, C 64) with 4 memory tokens, segments of 64 tokens, gradient through memory across one
# segment boundary; 16 parallel streams per process. Sized for a CPU; see README.md for larger settings.
TRAIN=(--user-dir "$REPO/user_dir" --task rmt_lm --arch rmt_tiny --criterion rmt_cross_entropy
  --tokens-per-sample 64 --mem-tokens 4 --bptt-unroll 1 --batch-size 16
  --optimizer adam --lr 2e-3 --lr-scheduler cosine --warmup-updates 100 --clip-norm 1.0 --max-update 2000
  --seed 1 --num-workers 0 --save-dir "$SAVE" --no-epoch-checkpoints --log-format simple --log-interval 100
  "${DEVICE[@]}")

case "$LAUNCHER" in
  fairseq)
    fairseq-train "$DATA" "${TRAIN[@]}" "$@" 2>&1 | tee "$SAVE/train.log"
    CKPT=$SAVE/checkpoint_best.pt
    ;;
  deepspeed)
    NODES_ARGS=()
    if [ -n "${HOSTFILE:-}" ]; then
      NODES_ARGS=(--hostfile "$HOSTFILE" --num_nodes "${NODES:-$(grep -c . "$HOSTFILE")}")
    fi
    deepspeed "${NODES_ARGS[@]}" --num_gpus "$GPUS" --master_port "$MASTER_PORT" "$(which rmt-deepspeed-train)" \
      "$DATA" "${TRAIN[@]}" --deepspeed-config "$DS_CONFIG" "$@" 2>&1 | tee "$SAVE/train.log"
    # ZeRO shards -> one fairseq checkpoint (the last one saved)
    rmt-deepspeed-export --checkpoint-dir "$SAVE" --out "$SAVE/checkpoint_export.pt"
    CKPT=$SAVE/checkpoint_export.pt
    ;;
  *) echo "error: LAUNCHER must be fairseq or deepspeed, got '$LAUNCHER'" >&2; exit 2 ;;
esac

# The whole test split cut into EVAL_BATCH_SIZE streams, memory carried across every segment (T: the trained
# one). Fewer streams: longer context carried, slower; each stream needs at least one segment of tokens.
fairseq-eval-lm "$DATA" --user-dir "$REPO/user_dir" --task rmt_lm --path "$CKPT" --batch-size "$EVAL_BATCH_SIZE" \
  --gen-subset test --num-workers 0 "${DEVICE[@]}" > "$SAVE/eval_test.log" 2>&1 \
  || { tail -5 "$SAVE/eval_test.log" >&2; exit 1; }
grep -E "Evaluated|Loss \(base 2\)" "$SAVE/eval_test.log" | sed 's/^.*eval_lm[:|] *//'

# Bits per character of the raw test text (prepare.sh's splits.json next to DATA): comparable across word, bpe
# and char. Loss per token x the test split's tokens (line ends included) / its characters (newlines included).
SPLITS=$(dirname "$DATA")/splits.json
if [ -f "$SPLITS" ]; then
  python - "$SAVE/eval_test.log" "$DATA/preprocess.log" "$SPLITS" <<'PY'
import json, re, sys
bits = float(re.search(r"Loss \(base 2\): ([\d.]+)", open(sys.argv[1]).read()).group(1))
log = open(sys.argv[2]).read()
tokens, unk = re.search(r"test\.txt: \d+ sents, (\d+) tokens, ([\d.]+)% replaced", log).groups()
chars = json.load(open(sys.argv[3]))["test"]["chars"]
note = f"; {unk}% of the tokens are <unk>, whose spelling costs nothing here: an underestimate" if float(unk) else ""
print(f"test: {bits * int(tokens) / chars:.4f} bits per character of the raw text ({tokens} tokens, {chars} "
      f"characters){note}")
PY
fi
