#!/usr/bin/env bash
# Creates .venv/ in the checkout, installs the pinned dependencies, builds dk_detectron2._C in place
# and installs dk_detectron2 into .venv in develop mode (`pip install --no-build-isolation -e .`),
# so that .venv/bin/python imports it from any directory. Idempotent: a second run with nothing
# changed only checks stamps and rebuilds nothing (seconds).
#
# CUDA kernels: built when a toolkit is found and a GPU is visible, or when DK_WITH_CUDA=1 (what CI
# sets in .ci/run); DK_WITH_CUDA=0 never. TORCH_CUDA_ARCH_LIST is respected; setup.py prints the
# architectures it builds.
#
# Output: a few "[setup]" progress lines, and errors. Everything the tools print (pip, the compiler,
# ninja) goes to build/setup.log; on a failure the last lines of it are shown.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
STAMP="$VENV/.deps-stamp"
REQ="$ROOT/requirements.txt"
LOG="$ROOT/build/setup.log"
mkdir -p "$ROOT/build"
: > "$LOG"

# Runs a command with its output in $LOG; on failure shows the log's error lines and last lines.
quiet() {
  if ! "$@" >>"$LOG" 2>&1; then
    echo "[setup] failed: $*" >&2
    grep -E -i '(^|[^a-z_])(error|fatal)[: ]' "$LOG" | grep -v -i 'warning' | head -n 20 >&2 || true
    echo "[setup] last lines of $LOG:" >&2
    tail -n 25 "$LOG" >&2
    exit 1
  fi
}

# The pinned torch is a CUDA build: with its NVIDIA libraries a new environment takes about 6 GiB.
# Refuse before starting when the disk cannot hold it, rather than stop half-installed.
MIN_FREE_GIB="${DK_SETUP_MIN_FREE_GIB:-6.5}"
if ! compgen -G "$VENV/lib/python*/site-packages/torch" >/dev/null; then
  free_kib=$(df -Pk "$ROOT" | awk 'NR == 2 {print $4}')
  if awk -v free="$free_kib" -v need="$MIN_FREE_GIB" 'BEGIN {exit !(free < need * 1048576)}'; then
    echo "[setup] not enough disk space: a new $VENV needs about $MIN_FREE_GIB GiB free" \
         "(DK_SETUP_MIN_FREE_GIB), but the file system of $ROOT has $((free_kib / 1024)) MiB free" >&2
    exit 1
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
elif ! "$VENV/bin/python" -c "import pip" >/dev/null 2>&1; then
  # A set-up killed while creating the environment leaves it without pip: start it again.
  echo "[setup] $VENV is incomplete (no pip); creating it again"
  "$PY" -m venv --clear "$VENV"
fi
VPY="$VENV/bin/python"

want=$(cat "$REQ" scripts/setup_env.sh | sha1sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  echo "[setup] installing pinned dependencies (torch, torchvision, detectron2, ...)"
  quiet "$VPY" -m pip install --upgrade "pip<26" wheel
  quiet "$VPY" -m pip install -r "$REQ"
  # Detectron2 has no official PyPI release: the sal-detectron2 wheel carries upstream's Python
  # sources. It is built for Python 3.10, so install it as plain files and put them on the path.
  D2="$VENV/detectron2-src"
  rm -rf "$D2"
  quiet "$VPY" -m pip install --no-deps --only-binary=:all: --python-version 3.10 \
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
echo "[setup] building dk_detectron2._C (only what changed; full log: build/setup.log)"
quiet "$VPY" setup.py build_ext --inplace
grep -h '^\[dk_detectron2\] CUDA kernels' "$LOG" | sed 's/^\[dk_detectron2\]/[setup]/' || true
DEV_STAMP="$VENV/.develop-stamp"
dev_want=$(printf '%s\n' "$ROOT" "$(sha1sum setup.py | cut -d' ' -f1)" | sha1sum | cut -d' ' -f1)
if [ ! -f "$DEV_STAMP" ] || [ "$(cat "$DEV_STAMP")" != "$dev_want" ] \
   || ! "$VPY" -m pip show -q dk_detectron2 >/dev/null 2>&1; then
  echo "[setup] installing dk_detectron2 into $VENV in develop mode"
  quiet "$VPY" -m pip install --no-build-isolation --no-deps -e .
  echo "$dev_want" > "$DEV_STAMP"
fi
(cd / && "$VPY" -c "import dk_detectron2._C") \
  || { echo "[setup] building or installing dk_detectron2._C failed" >&2; exit 1; }
echo "[setup] ready: $VENV ($("$VPY" -c 'from dk_detectron2.layers import _extension as e
print("CPU + CUDA kernels" if e.compiled_with_cuda() else "CPU kernels")'))"
