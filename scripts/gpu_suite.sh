#!/usr/bin/env bash
# The GPU suite: `pytest -m gpu` (tests/gpu) on one CUDA GPU, in under five minutes once installed.
#
#   bash scripts/gpu_suite.sh            # in an environment with fairseq, deepspeed and this checkout
#
# On a bare CUDA image (torch only), put the missing packages' wheels/sdists in .whl/ first (an ignored folder;
# see DEVELOPERS.md "GPU suite" for the list and the pip download line); they are installed into /tmp/site
# without touching the image's torch. fairseq builds its C++ extensions from its sdist there (a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import fairseq, deepspeed, hydra" >/dev/null 2>&1; then
  if [ ! -d .whl ]; then
    echo "error: fairseq/deepspeed are not importable and there is no .whl/ folder to install them from" >&2
    exit 2
  fi
  t0=$(date +%s)
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/site \
    .whl/*
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  echo "[gpu_suite] installed .whl/ into /tmp/site in $(( $(date +%s) - t0 )) s"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('[gpu_suite]', torch.__version__, torch.cuda.get_device_name(0))"
t0=$(date +%s)
"$PY" -m pytest -m gpu tests/gpu -q -rA -p no:cacheprovider "$@"
echo "[gpu_suite] pytest -m gpu took $(( $(date +%s) - t0 )) s"
