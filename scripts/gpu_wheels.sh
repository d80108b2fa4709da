#!/usr/bin/env bash
# Downloads, on a machine with the package index, every wheel that scripts/gpu_check.sh needs and
# that a preinstalled GPU host lacks (one with python3 holding torch, torchvision, numpy, PyYAML,
# tqdm, Pillow, tabulate, portalocker, matplotlib, pytest, but no network), so that the check
# can install them there with `pip install --no-index`:
#
#   scripts/gpu_wheels.sh DIR [--python-version 3.12]      (DIR: an ignored folder, e.g. .whl)
#
# DIR receives (about 10 MiB in all):
#   * sal-detectron2==0.7.2, Detectron2's upstream sources as scripts/setup_env.sh installs them
#     (a Python 3.10 wheel; gpu_check.sh unpacks its files and drops its top-level `tools`);
#   * fvcore, iopath, yacs, omegaconf, hydra-core, termcolor, antlr4-python3-runtime: pure Python
#     (those published as source only are built into wheels here);
#   * pycocotools, compiled: the binary wheel for CPython --python-version on manylinux x86_64.
# Then: copy DIR with the checkout (device tools: name it in `carry`) and run
#   scripts/gpu_check.sh --wheels DIR
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

usage() { echo "usage: scripts/gpu_wheels.sh DIR [--python-version X.Y]" >&2; exit 2; }
DIR="" PYVER="3.12"
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) [ $# -ge 2 ] || usage; PYVER=$2; shift 2 ;;
    --python-version=*) PYVER=${1#*=}; shift ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) usage ;;
    *) [ -z "$DIR" ] || usage; DIR=$1; shift ;;
  esac
done
[ -n "$DIR" ] || usage
[[ "$PYVER" =~ ^3\.[0-9]+$ ]] || { echo "gpu_wheels: --python-version must look like 3.12" >&2; exit 2; }

# Any Python with pip will do (the venv's if there is one); it only downloads and builds wheels.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOG="$WORK/pip.log"
run() {
  if ! "$@" >>"$LOG" 2>&1; then
    echo "gpu_wheels: failed: $*" >&2; tail -n 20 "$LOG" >&2; exit 1
  fi
}

# The versions the CPU set-up resolves today; pinned so that DIR is reproducible.
PURE=(fvcore==0.1.5.post20221221 iopath==0.1.10 yacs==0.1.8 omegaconf==2.3.1 hydra-core==1.3.8
      termcolor==3.3.0 antlr4-python3-runtime==4.9.3)
echo "[gpu_wheels] pure-Python wheels (built here where only sources are published)"
# `pip wheel` reuses a published wheel as is and builds one from sources otherwise; pure Python,
# so the interpreter running it does not matter.
run "$PY" -m pip wheel --no-deps --wheel-dir "$WORK/pure" "${PURE[@]}"
echo "[gpu_wheels] pycocotools for CPython $PYVER, manylinux x86_64"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do PLATFORMS+=(--platform "$p"); done
run "$PY" -m pip download --no-deps --only-binary=:all: --implementation cp \
    --python-version "$PYVER" "${PLATFORMS[@]}" --dest "$WORK/binary" "pycocotools==2.0.11"
echo "[gpu_wheels] sal-detectron2 0.7.2 (Detectron2's sources, as scripts/setup_env.sh takes them)"
run "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.10 \
    --dest "$WORK/d2" sal-detectron2==0.7.2

rm -f "$DIR"/*.whl
cp "$WORK"/pure/*.whl "$WORK"/binary/*.whl "$WORK"/d2/*.whl "$DIR"/
ls -1 "$DIR"/*.whl | sed "s|^$DIR/|  |"
size=$(du -sk "$DIR" | cut -f1)
echo "[gpu_wheels] $DIR: $(ls "$DIR"/*.whl | wc -l) wheels, $((size / 1024)) MiB ($size KiB)"
if [ "$size" -gt $((30 * 1024)) ]; then
  echo "gpu_wheels: $DIR holds more than 30 MiB: too much to travel with the checkout" >&2
  exit 1
fi
