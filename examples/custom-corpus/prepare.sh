#!/usr/bin/env bash
# Any raw text file -> fairseq data-bin for --task rmt_lm.
#
#   LEVEL=word|bpe|char examples/custom-corpus/prepare.sh RAW_FILE OUT_DIR
#
# Splits RAW in order by characters at line ends (train = first ~90%, valid = next ~5%, test = last ~5%),
# tokenizes (word: sacremoses Moses tokenizer, escape=False; bpe: sentencepiece BPE trained on train only;
# char: one token per character, whitespace shown as "▁", a newline ends the line), then runs
# fairseq-preprocess --only-source. Train with: DATA=OUT_DIR/bin examples/custom-corpus/run.sh
#
# Settings (environment): RAW and OUT (instead of the arguments), LEVEL (default char), LANG_ID (Moses
# language, default en), VOCAB_SIZE (bpe, upper bound, default 8000), COVERAGE (sentencepiece
# character_coverage, default 1.0), NWORDS (keep the N most frequent types, default -1 = all), WORKERS.
# Writes OUT/text/ (raw splits), OUT/tok/ (tokenized), OUT/spm.model (bpe), OUT/splits.json, OUT/bin/ (data-bin).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
RAW=${1:-${RAW:-}}
LEVEL=${LEVEL:-char}
OUT=${2:-${OUT:-outputs/custom-corpus/$LEVEL}}
LANG_ID=${LANG_ID:-en}
VOCAB_SIZE=${VOCAB_SIZE:-8000}
COVERAGE=${COVERAGE:-1.0}
NWORDS=${NWORDS:--1}
WORKERS=${WORKERS:-$(nproc 2>/dev/null || echo 1)}
if [ "$WORKERS" -gt 8 ]; then WORKERS=8; fi

die() { echo "error: $*" >&2; exit 2; }
[ -n "$RAW" ] || die "no raw text file given (usage: LEVEL=word|bpe|char $0 RAW_FILE OUT_DIR)"
[ -f "$RAW" ] || die "raw text file not found: $RAW"
[ -s "$RAW" ] || die "raw text file is empty: $RAW"
case "$LEVEL" in word|bpe|char) ;; *) die "LEVEL must be word, bpe or char, got '$LEVEL'" ;; esac

python "$HERE/prepare_text.py" "$RAW" "$OUT" --level "$LEVEL" --lang "$LANG_ID" --vocab-size "$VOCAB_SIZE" \
  --character-coverage "$COVERAGE" --workers "$WORKERS"

# --padding-factor 1: no "madeupword" fillers in dict.txt, so a char-level dictionary stays all single
# characters (rmt_lm then logs bits per character, bpc). fairseq-preprocess refuses an existing dict.txt.
# bpe: the dictionary is every sentencepiece piece (spm.dict.txt), not only those train's segmentation uses.
DICT=()
if [ "$LEVEL" = bpe ]; then DICT=(--srcdict "$OUT/spm.dict.txt"); fi
rm -rf "$OUT/bin"
if ! fairseq-preprocess --only-source --trainpref "$OUT/tok/train.txt" --validpref "$OUT/tok/valid.txt" \
  --testpref "$OUT/tok/test.txt" --destdir "$OUT/bin" "${DICT[@]}" --nwordssrc "$NWORDS" --padding-factor 1 \
  --workers "$WORKERS" > "$OUT/preprocess.log" 2>&1; then
  tail -3 "$OUT/preprocess.log" >&2
  die "fairseq-preprocess failed (log: $OUT/preprocess.log)"
fi
grep -E "\[None\] .*(train|valid|test)\.txt: " "$OUT/bin/preprocess.log" | sed 's/^.*\[None\] /  /' || true
echo "dictionary: $(($(wc -l < "$OUT/bin/dict.txt") + 4)) types (4 special); data-bin: $OUT/bin"
