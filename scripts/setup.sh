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

# Which modules import, checked in one interpreter (a process per module took 12 s of every make target once
# everything was installed); re-checked after each install step, since a step can bring in more than its name.
MODULES="torch Cython numpy setuptools wheel fairseq hydra omegaconf sacrebleu bitarray sklearn regex deepspeed
sentencepiece sacremoses pytest xdist matplotlib psutil"
check() {
  MISSING="$("$PY" - $MODULES 2>/dev/null <<'PYEOF'
import importlib, sys
found = {}
for name in sys.argv[1:]:
    try:
        found[name] = importlib.import_module(name)
    except Exception:
        print(name)
if all(m in found for m in ("torch", "fairseq", "deepspeed")):
    print("[setup] ok: torch", found["torch"].__version__, "| fairseq", found["fairseq"].__version__,
          "| deepspeed", found["deepspeed"].__version__)
PYEOF
)" || MISSING="$MODULES"
}
has() { ! grep -qx "$1" <<<"$MISSING"; }
check

if ! has torch; then
  echo "[setup] installing torch==$TORCH_VERSION"
  "${PIP[@]}" "torch==$TORCH_VERSION"
  check
fi
if ! has Cython || ! has numpy || ! has setuptools || ! has wheel; then
  echo "[setup] installing build requirements"
  "${PIP[@]}" numpy cython setuptools wheel
  check
fi
if ! has fairseq; then
  echo "[setup] building fairseq-fixed==0.12.3.1 (a few minutes the first time; cached afterwards)"
  "${PIP[@]}" --no-build-isolation --no-deps fairseq-fixed==0.12.3.1
  check
fi
if ! has hydra || ! has omegaconf || ! has sacrebleu || ! has bitarray || ! has sklearn || ! has regex; then
  echo "[setup] installing fairseq runtime requirements"
  "${PIP[@]}" hydra-core==1.3.2 omegaconf==2.3.0 regex sacrebleu tqdm bitarray scikit-learn cffi packaging
  check
fi
if ! has deepspeed; then
  echo "[setup] installing deepspeed==0.19.8"
  "${PIP[@]}" --no-build-isolation deepspeed==0.19.8
  check
fi
if ! has sentencepiece || ! has sacremoses || ! has pytest || ! has xdist || ! has matplotlib || ! has psutil; then
  echo "[setup] installing sentencepiece, sacremoses, pytest, pytest-xdist, matplotlib, psutil"
  "${PIP[@]}" sentencepiece sacremoses pytest pytest-xdist matplotlib psutil
  check
fi
if ! "$PY" -c "import rmt_fairseq, importlib.metadata as m; m.version('rmt-fairseq')" >/dev/null 2>&1; then
  echo "[setup] installing rmt-fairseq (editable)"
  "${PIP[@]}" --no-build-isolation --no-deps -e .
  check
fi
# The startup hook of rmt_fairseq/quiet.py: hides the two notices fairseq's own imports print on every command
# (DeepSpeed's "Setting accelerator to CPU", "Please install tensorboardX"), before the plugin can be imported. It
# runs quiet.py alone (quiet.STARTUP_HOOK), never the package, whose import registers the plugin with fairseq; an
# earlier hook (it imported the package) is replaced.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
HOOK="$("$PY" -S -c 'import runpy; print(runpy.run_path("rmt_fairseq/quiet.py")["STARTUP_HOOK"])')"
if [ "$(cat "$SITE/rmt_fairseq_quiet.pth" 2>/dev/null)" != "$HOOK" ]; then
  echo "$HOOK" > "$SITE/rmt_fairseq_quiet.pth"
fi
# fairseq must import cleanly with this torch (catches a broken or mismatched install early): the last check's line.
if ! grep '^\[setup\] ok' <<<"$MISSING"; then
  echo "[setup] error: torch, fairseq and deepspeed do not all import in $VENV" >&2
  exit 1
fi
