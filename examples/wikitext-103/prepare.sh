#!/usr/bin/env bash
# WikiText-103 -> fairseq data-bin for --task rmt_lm (word level), as fairseq's examples/language_model does.
#
#   examples/wikitext-103/prepare.sh [WT103]   WT103: wikitext-103-v1.zip or its unzipped wikitext-103/ directory
#                                              (default: download)
#
# Without a local copy, downloads the raw-token wikitext-103-v1.zip from the URL of fairseq's
# examples/language_model/prepare-wikitext-103.sh into $DOWNLOAD_DIR and unzips it, then runs fairseq's
# binarization unchanged: fairseq-preprocess --only-source on wiki.{train,valid,test}.tokens (the dictionary is
# every word of train; the text already has <unk> for rare words).
#
# Settings (environment): WT103 (instead of the argument), DOWNLOAD_DIR (default data), OUT (data-bin, default
# data-bin/wikitext-103), WORKERS (default: CPU count, at most 20 as in fairseq's README), WT103_URL, FORCE=1
# (redo an existing $OUT).
set -euo pipefail
WT103=${1:-${WT103:-}}
DOWNLOAD_DIR=${DOWNLOAD_DIR:-data}
OUT=${OUT:-data-bin/wikitext-103}
URL=${WT103_URL:-https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip}
WORKERS=${WORKERS:-$(nproc 2>/dev/null || echo 1)}
if [ "$WORKERS" -gt 20 ]; then WORKERS=20; fi

die() { echo "error: $*" >&2; exit 2; }

if [ -f "$OUT/dict.txt" ]; then
  if [ "${FORCE:-0}" != 1 ]; then
    echo "already prepared: $OUT (FORCE=1 to prepare again)"
    exit 0
  fi
  rm -f "$OUT/dict.txt"  # fairseq-preprocess refuses to overwrite a dictionary
fi

unzip_into() {  # ZIP DIR: unzip and print the directory holding wiki.train.tokens
  unzip -q -o "$1" -d "$2" || die "could not unzip $1"
  local d
  d=$(dirname "$(find "$2" -name wiki.train.tokens -print -quit)")
  [ "$d" != . ] || die "$1 has no wiki.train.tokens"
  echo "$d"
}

if [ -n "$WT103" ]; then
  if [ -d "$WT103" ]; then
    TEXT=$WT103
  elif [ -f "$WT103" ]; then
    TEXT=$(unzip_into "$WT103" "$DOWNLOAD_DIR")
  else
    die "WT103=$WT103 is neither the wikitext-103 directory nor wikitext-103-v1.zip"
  fi
elif [ -f "$DOWNLOAD_DIR/wikitext-103/wiki.train.tokens" ]; then
  TEXT=$DOWNLOAD_DIR/wikitext-103
  echo "using $TEXT (downloaded before)"
else
  mkdir -p "$DOWNLOAD_DIR"
  zip="$DOWNLOAD_DIR/wikitext-103-v1.zip"
  echo "downloading $URL ..."
  if command -v wget >/dev/null; then
    fetch() { wget --tries 3 --timeout 60 -q -O "$zip.part" "$URL"; }
  else
    fetch() { curl -fsSL --retry 3 --connect-timeout 60 -o "$zip.part" "$URL"; }
  fi
  if ! fetch; then
    rm -f "$zip.part"
    die "could not download $URL (no network, or the file moved: set WT103_URL). Download wikitext-103-v1.zip
where there is network access and pass it:
  WT103=/path/to/wikitext-103-v1.zip $0     (or the unzipped wikitext-103 directory)"
  fi
  mv "$zip.part" "$zip"
  TEXT=$(unzip_into "$zip" "$DOWNLOAD_DIR")
fi

for split in train valid test; do
  [ -s "$TEXT/wiki.$split.tokens" ] || die "$TEXT/wiki.$split.tokens is missing or empty"
done

# fairseq examples/language_model/README.md, "Preprocess/binarize the data"
mkdir -p "$OUT"
if ! fairseq-preprocess --only-source --trainpref "$TEXT/wiki.train.tokens" --validpref "$TEXT/wiki.valid.tokens" \
  --testpref "$TEXT/wiki.test.tokens" --destdir "$OUT" --workers "$WORKERS" > "$OUT/preprocess.stdout" 2>&1; then
  tail -5 "$OUT/preprocess.stdout" >&2
  rm -f "$OUT/dict.txt"  # not prepared: the next run must not skip
  die "fairseq-preprocess failed (log: $OUT/preprocess.stdout)"
fi
grep -E "\[None\] .*wiki\.(train|valid|test)\.tokens: " "$OUT/preprocess.log" | sed 's/^.*\[None\] /  /' || true
echo "data-bin: $OUT ($(wc -l < "$OUT/dict.txt") words + 4 special)"
