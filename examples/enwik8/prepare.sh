#!/usr/bin/env bash
# enwik8 -> fairseq data-bin for --task rmt_lm, split and tokenized as Transformer-XL does (byte level).
#
#   examples/enwik8/prepare.sh [ENWIK8]      ENWIK8: enwik8.zip or the unzipped enwik8 file (default: download)
#
# Without a local copy, downloads http://mattmahoney.net/dc/enwik8.zip into $DOWNLOAD_DIR. prepare_enwik8.py then
# writes the 90M / 5M / 5M byte splits as space-separated byte values, one text line per original line (exactly
# awd-lstm-lm's prep_enwik8.py, which Transformer-XL's getdata.sh runs), and fairseq-preprocess --only-source
# binarizes them with a dictionary of the byte values (the newline byte becomes </s>).
#
# Settings (environment): ENWIK8 (instead of the argument), DOWNLOAD_DIR (default data/enwik8), TEXT (tokenized
# splits, default $DOWNLOAD_DIR/text), OUT (data-bin, default data-bin/enwik8), WORKERS, ENWIK8_URL, FORCE=1
# (redo an existing $OUT), TRAIN_BYTES / VALID_BYTES / TEST_BYTES (split sizes, for tests on small files).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ENWIK8=${1:-${ENWIK8:-}}
DOWNLOAD_DIR=${DOWNLOAD_DIR:-data/enwik8}
TEXT=${TEXT:-$DOWNLOAD_DIR/text}
OUT=${OUT:-data-bin/enwik8}
URL=${ENWIK8_URL:-http://mattmahoney.net/dc/enwik8.zip}
WORKERS=${WORKERS:-$(nproc 2>/dev/null || echo 1)}
if [ "$WORKERS" -gt 20 ]; then WORKERS=20; fi

die() { echo "error: $*" >&2; exit 2; }

if [ -f "$OUT/dict.txt" ] && [ "${FORCE:-0}" != 1 ]; then
  echo "already prepared: $OUT (FORCE=1 to prepare again)"
  exit 0
fi

if [ -n "$ENWIK8" ]; then
  [ -f "$ENWIK8" ] || die "ENWIK8=$ENWIK8 is not a file (give enwik8.zip or the unzipped enwik8)"
elif [ -f "$DOWNLOAD_DIR/enwik8.zip" ]; then
  ENWIK8=$DOWNLOAD_DIR/enwik8.zip
  echo "using $ENWIK8 (downloaded before)"
else
  mkdir -p "$DOWNLOAD_DIR"
  echo "downloading $URL ..."
  part="$DOWNLOAD_DIR/enwik8.zip.part"
  if command -v wget >/dev/null; then
    fetch() { wget --tries 3 --timeout 60 -q -O "$part" "$URL"; }
  else
    fetch() { curl -fsSL --retry 3 --connect-timeout 60 -o "$part" "$URL"; }
  fi
  if ! fetch; then
    rm -f "$part"
    die "could not download $URL (no network?). Download enwik8.zip where there is network access and pass it:
  ENWIK8=/path/to/enwik8.zip $0     (or the unzipped enwik8 file)"
  fi
  mv "$part" "$DOWNLOAD_DIR/enwik8.zip"
  ENWIK8=$DOWNLOAD_DIR/enwik8.zip
fi

SIZES=()
if [ -n "${TRAIN_BYTES:-}" ]; then SIZES+=(--train-bytes "$TRAIN_BYTES"); fi
if [ -n "${VALID_BYTES:-}" ]; then SIZES+=(--valid-bytes "$VALID_BYTES"); fi
if [ -n "${TEST_BYTES:-}" ]; then SIZES+=(--test-bytes "$TEST_BYTES"); fi
python "$HERE/prepare_enwik8.py" "$ENWIK8" "$TEXT" "${SIZES[@]}"

# --srcdict: every byte value of the three splits (Transformer-XL's vocabulary counts all three), so valid and
# test have no <unk>; fairseq-preprocess adds <s> <pad> </s> <unk> in front.
mkdir -p "$OUT"  # fairseq-preprocess overwrites its own files there (dict.txt, {train,valid,test}.{bin,idx})
if ! fairseq-preprocess --only-source --srcdict "$TEXT/dict.txt" --trainpref "$TEXT/train.txt" \
  --validpref "$TEXT/valid.txt" --testpref "$TEXT/test.txt" --destdir "$OUT" --workers "$WORKERS" \
  > "$OUT/preprocess.stdout" 2>&1; then
  tail -5 "$OUT/preprocess.stdout" >&2
  rm -f "$OUT/dict.txt"  # not prepared: the next run must not skip
  die "fairseq-preprocess failed (log: $OUT/preprocess.stdout)"
fi
grep -E "\[None\] .*(train|valid|test)\.txt: " "$OUT/preprocess.log" | sed 's/^.*\[None\] /  /' || true
echo "data-bin: $OUT ($(wc -l < "$OUT/dict.txt") byte symbols + 4 special)"
