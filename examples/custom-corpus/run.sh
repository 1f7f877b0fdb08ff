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

# rmt_tiny (2 layers, C 64) with its preset's 4 memory tokens (another --arch brings its own: armt_tiny 8), segments
# of 64 tokens, gradient through memory across one segment boundary; 16 parallel streams per process. Sized for a
# CPU; see README.md for larger settings.
TRAIN=(--user-dir "$REPO/user_dir" --task rmt_lm --arch rmt_tiny --criterion rmt_cross_entropy
  --tokens-per-sample 64 --bptt-unroll 1 --batch-size 16
  --optimizer adam --lr 2e-3 --lr-scheduler cosine --warmup-updates 100 --clip-norm 1.0 --max-update 2000
  --seed 1 --num-workers 0 --save-dir "$SAVE" --no-epoch-checkpoints --log-format simple --log-interval 100
  "${DEVICE[@]}")

SECONDS=0
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
    CKPT=$SAVE/checkpoint_best.pt  # rank 0's file: a fairseq checkpoint (the weights gathered under ZeRO-3)
    ;;
  *) echo "error: LAUNCHER must be fairseq or deepspeed, got '$LAUNCHER'" >&2; exit 2 ;;
esac
TRAIN_SECONDS=$SECONDS

# The whole test split cut into EVAL_BATCH_SIZE streams, memory carried across every segment (T: the trained
# one). Fewer streams: longer context carried, slower; each stream needs at least one segment of tokens.
fairseq-eval-lm "$DATA" --user-dir "$REPO/user_dir" --task rmt_lm --path "$CKPT" --batch-size "$EVAL_BATCH_SIZE" \
  --gen-subset test --num-workers 0 "${DEVICE[@]}" > "$SAVE/eval_test.log" 2>&1 \
  || { tail -5 "$SAVE/eval_test.log" >&2; exit 1; }
grep -E "Evaluated|Loss \(base 2\)" "$SAVE/eval_test.log" | sed 's/^.*eval_lm[:|] *//'

# Bits per character of the raw test text (prepare.sh's splits.json next to DATA): comparable across word, bpe
# and char. Loss per token x the test split's tokens (line ends included) / its characters (newlines included).
# Everything measured goes to $SAVE/results.json, with the commands and the commit (rmt_fairseq/provenance.py).
python - "$SAVE" "$DATA" "$SECONDS" "$TRAIN_SECONDS" "$LAUNCHER" "$@" <<'PY'
import json, os, re, sys
from rmt_fairseq.provenance import provenance
save, data, wall, train_wall, launcher, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
    sys.argv[5], sys.argv[6:]
ev, tr = open(f"{save}/eval_test.log").read(), open(f"{save}/train.log").read()
bits = float(re.search(r"Loss \(base 2\): ([\d.]+)", ev).group(1))
scored = int(re.search(r"Evaluated ([\d,]+) tokens", ev).group(1).replace(",", ""))
valid = re.findall(r"valid on 'valid' subset \| loss ([\d.]+)", tr)
updates = re.findall(r"num_updates[ =](\d+)", tr)
log = open(f"{data}/preprocess.log").read()
tokens, unk = re.search(r"test\.txt: \d+ sents, (\d+) tokens, ([\d.]+)% replaced", log).groups()
splits = os.path.join(os.path.dirname(data), "splits.json")
level = json.load(open(splits)).get("level") if os.path.exists(splits) else None
dict_size = sum(1 for _ in open(f"{data}/dict.txt"))
r = {"data": data, "level": level or ("char" if dict_size < 300 else "word or bpe"), "launcher": launcher,
     "extra_flags": extra, "updates": int(updates[-1]) if updates else None,
     "valid_loss": float(valid[-1]) if valid else None, "test_loss": bits, "test_tokens": int(tokens),
     "test_tokens_scored": scored, "unk_percent": float(unk), "wall_seconds": wall, "train_seconds": train_wall,
     "provenance": provenance(["examples/custom-corpus/run.sh", *extra])}
if os.path.exists(splits):
    chars = json.load(open(splits))["test"]["chars"]
    r["test_chars"] = chars
    r["test_bpc_raw"] = bits * int(tokens) / chars
    note = f"; {unk}% of the tokens are <unk>, whose spelling costs nothing here: an underestimate" if float(unk) else ""
    print(f"test: {r['test_bpc_raw']:.4f} bits per character of the raw text ({tokens} tokens, {chars} "
          f"characters){note}")
# not scored: the first token (context only) and the (N - 1) mod streams tokens of the tail (rmt_fairseq/data/streams.py)
print(f"scored {scored:,} of the {int(tokens):,} test tokens (the first is context only, the last "
      f"{int(tokens) - 1 - scored} do not fill the {os.environ.get('EVAL_BATCH_SIZE', 16)} streams)")
json.dump(r, open(f"{save}/results.json", "w"), indent=2)
print(f"wrote {save}/results.json")
PY
