#!/usr/bin/env bash
# Set up (or verify) the environment for rmt-fairseq. Idempotent: every step checks first, so a second run
# takes seconds. Uses the active virtualenv if there is one, else creates .venv/ in the checkout.
#
# Why the steps look like this (measured on Python 3.11, CPU):
#  - torch is installed only when none is importable (a cluster env keeps its CUDA build); pinned to the CPU
#    wheel version when we do install it, because an unpinned torch pulls a multi-GB CUDA build.
#  - PyPI fairseq==0.12.2 does not build on 3.11; fairseq-fixed 0.12.3.1 (same `import fairseq`) does, with
#    --no-build-isolation --no-deps (build isolation or dependency resolution would fetch another torch via
#    torchaudio). Its runtime requirements are installed explicitly below.
#  - deepspeed also needs --no-build-isolation for the same reason.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION="${RMT_TORCH_VERSION:-2.13.0}"
if [ -n "${VIRTUAL_ENV:-}" ]; then
  VENV="$VIRTUAL_ENV"
else
  VENV="$PWD/.venv"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    python3 -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

has() { "$PY" -c "import $1" >/dev/null 2>&1; }

if ! has torch; then
  echo "[setup] installing torch==$TORCH_VERSION"
  "${PIP[@]}" "torch==$TORCH_VERSION"
fi
if ! has Cython || ! has numpy || ! has setuptools || ! has wheel; then
  echo "[setup] installing build requirements"
  "${PIP[@]}" numpy cython setuptools wheel
fi
if ! has fairseq; then
  echo "[setup] building fairseq-fixed==0.12.3.1 (a few minutes the first time; cached afterwards)"
  "${PIP[@]}" --no-build-isolation --no-deps fairseq-fixed==0.12.3.1
fi
if ! has hydra || ! has omegaconf || ! has sacrebleu || ! has bitarray || ! has sklearn || ! has regex; then
  echo "[setup] installing fairseq runtime requirements"
  "${PIP[@]}" hydra-core==1.3.2 omegaconf==2.3.0 regex sacrebleu tqdm bitarray scikit-learn cffi packaging
fi
if ! has deepspeed; then
  echo "[setup] installing deepspeed==0.19.8"
  "${PIP[@]}" --no-build-isolation deepspeed==0.19.8
fi
if ! has sentencepiece || ! has sacremoses || ! has pytest || ! has xdist || ! has matplotlib || ! has psutil; then
  echo "[setup] installing sentencepiece, sacremoses, pytest, pytest-xdist, matplotlib, psutil"
  "${PIP[@]}" sentencepiece sacremoses pytest pytest-xdist matplotlib psutil
fi
if ! "$PY" -c "import rmt_fairseq, importlib.metadata as m; m.version('rmt-fairseq')" >/dev/null 2>&1; then
  echo "[setup] installing rmt-fairseq (editable)"
  "${PIP[@]}" --no-build-isolation --no-deps -e .
fi
# The startup hook of rmt_fairseq/quiet.py: hides the two notices fairseq's own imports print on every command
# (DeepSpeed's "Setting accelerator to CPU", "Please install tensorboardX"), before the plugin can be imported.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ ! -f "$SITE/rmt_fairseq_quiet.pth" ]; then
  echo 'import sys; exec("try:\n import rmt_fairseq.quiet as q; q.install()\nexcept Exception:\n pass")' \
    > "$SITE/rmt_fairseq_quiet.pth"
fi
# fairseq must import cleanly with this torch (catches a broken or mismatched install early).
"$PY" -c "import torch, fairseq, deepspeed; print('[setup] ok: torch', torch.__version__, '| fairseq', fairseq.__version__, '| deepspeed', deepspeed.__version__)" 2>&1 | grep '^\[setup\]'
