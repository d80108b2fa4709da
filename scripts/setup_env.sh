#!/usr/bin/env bash
# Creates .venv/ in the checkout, installs the pinned dependencies, builds dk_detectron2._C in place
# and installs dk_detectron2 into .venv in develop mode (`pip install --no-build-isolation -e .`),
# so that .venv/bin/python imports it from any directory. Idempotent: a second run with nothing
# changed only checks stamps and rebuilds nothing (seconds).
#
# CUDA kernels: built when a toolkit is found and a GPU is visible, or when DK_WITH_CUDA=1 (what CI
# sets in .ci/run); DK_WITH_CUDA=0 never. TORCH_CUDA_ARCH_LIST is respected; setup.py prints the
# architectures it builds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
STAMP="$VENV/.deps-stamp"
REQ="$ROOT/requirements.txt"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

want=$(cat "$REQ" scripts/setup_env.sh | sha1sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  echo "[setup] installing pinned dependencies (torch, torchvision, detectron2, ...)"
  "$VPY" -m pip install -q --upgrade "pip<26" wheel
  "$VPY" -m pip install -q -r "$REQ"
  # Detectron2 has no official PyPI release: the sal-detectron2 wheel carries upstream's Python
  # sources. It is built for Python 3.10, so install it as plain files and put them on the path.
  D2="$VENV/detectron2-src"
  rm -rf "$D2"
  "$VPY" -m pip install -q --no-deps --only-binary=:all: --python-version 3.10 \
      --target "$D2" sal-detectron2==0.7.2
  rm -rf "$D2/tools" "$D2/bin"   # its top-level `tools` package would shadow ours
  site=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$D2" > "$site/detectron2-src.pth"
  echo "$want" > "$STAMP"
fi

# The CUDA toolkit, if any (setup.py decides whether to use it and for which architectures).
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda-13.0 /usr/local/cuda; do
    if [ -x "$d/bin/nvcc" ] && "$d/bin/nvcc" --version >/dev/null 2>&1; then export CUDA_HOME="$d"; break; fi
  done
fi
export MAX_JOBS="${MAX_JOBS:-2}"
# Build in place (ninja makes a no-op rebuild take about a second; setup.py says which CUDA
# architectures, if any, it builds), then install in develop mode once: the stamp records this
# checkout and setup.py, so another checkout or a changed setup.py reinstalls.
filter() { grep -v -e '^running' -e 'UserWarning' -e 'warnings.warn' || true; }
"$VPY" setup.py -q build_ext --inplace 2>&1 | filter
DEV_STAMP="$VENV/.develop-stamp"
dev_want=$(printf '%s\n' "$ROOT" "$(sha1sum setup.py | cut -d' ' -f1)" | sha1sum | cut -d' ' -f1)
if [ ! -f "$DEV_STAMP" ] || [ "$(cat "$DEV_STAMP")" != "$dev_want" ] \
   || ! "$VPY" -m pip show -q dk_detectron2 >/dev/null 2>&1; then
  echo "[setup] installing dk_detectron2 into $VENV in develop mode"
  "$VPY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | filter
  echo "$dev_want" > "$DEV_STAMP"
fi
(cd / && "$VPY" -c "import dk_detectron2._C") \
  || { echo "[setup] building or installing dk_detectron2._C failed" >&2; exit 1; }
echo "[setup] ready: $VENV ($("$VPY" -c 'from dk_detectron2.layers import _extension as e
print("CPU + CUDA kernels" if e.compiled_with_cuda() else "CPU kernels")'))"
