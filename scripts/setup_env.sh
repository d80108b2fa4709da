#!/usr/bin/env bash
# Creates .venv/ in the checkout, installs the pinned dependencies and builds dk_detectron2._C in
# place. Idempotent: a second run with nothing changed only checks stamps and returns in seconds.
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

# Build the extension in place (ninja makes a no-op rebuild take about a second). setup.py adds
# the CUDA kernels when a toolkit is found, for TORCH_CUDA_ARCH_LIST or its default list.
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda-13.0 /usr/local/cuda; do
    if [ -x "$d/bin/nvcc" ] && "$d/bin/nvcc" --version >/dev/null 2>&1; then export CUDA_HOME="$d"; break; fi
  done
fi
export MAX_JOBS="${MAX_JOBS:-2}"
"$VPY" setup.py -q build_ext --inplace 2>&1 | grep -v -e '^running' -e 'UserWarning' || true
"$VPY" -c "import dk_detectron2._C" || { echo "[setup] building dk_detectron2._C failed" >&2; exit 1; }
echo "[setup] ready: $VENV"
