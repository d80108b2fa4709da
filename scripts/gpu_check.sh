#!/usr/bin/env bash
# The whole CUDA check in one command, for a borrowed GPU host without network (docs/notes/cuda.md):
#
#   scripts/gpu_check.sh [--wheels DIR] [--full] [--setup-only] [OUTPUT_DIR]
#
# Uses the Python it finds ($PYTHON, else python3) when it holds torch; never creates a venv and
# never reaches the network (pip runs with --no-index). Default OUTPUT_DIR: output/gpu_check.
#  deps       the wheels of DIR (scripts/gpu_wheels.sh made them elsewhere) installed into
#             build/gpu_deps (on PYTHONPATH; reused while DIR is unchanged), or, without --wheels,
#             Detectron2, fvcore, ... found importable;
#  build      dk_detectron2._C built in place, for the visible GPU only, with -lineinfo (a second
#             run reuses the build: ninja recompiles nothing);
#  imports    torch, Detectron2 and its dependencies, dk_detectron2; the DK Mask R-CNN built; an
#             operator forward + backward (on the GPU: the library holds code for it);
#             --setup-only stops here and needs no GPU (CPU kernels);
#  tests      tests/test_ops_cuda.py, tests/test_ops_cuda_grouped.py (a skip counts as a failure);
#  memcheck   compute-sanitizer memcheck over one pass of every operator, forward + backward,
#             float32 and bfloat16 (scripts/gpu_check_ops.py), the caching allocator off;
#  racecheck, synccheck   the shared-memory kernel (dk_grad_weight_partial_kernel);
#  initcheck  every operator's kernels: no read of uninitialised device memory;
#  timing     CUDA-event timings at real shapes against cuDNN and torchvision
#             (scripts/gpu_check_bench.py; a slow kernel is reported, not failed);
#  train      20 iterations of the DK and the rigid Mask R-CNN, float32 and AMP: finite losses,
#             the DK / rigid time ratio reported (scripts/gpu_check_train.py).
# --full adds: memcheck in every dtype, racecheck of every kernel, the benchmark's CUDA section,
# 50 training iterations. Each step runs under its time limit (LIMITS_DEFAULT: the default run
# stays inside 6 minutes on 16 cores, nvcc build included; DK_GPU_CHECK_TIME_SCALE=N multiplies
# every limit, for slower machines such as a CPU machine's --setup-only).
# Writes OUTPUT_DIR/report.md (versions, one line per step: PASS/FAIL and seconds, the failing
# tests, the sanitizers' ERROR SUMMARY lines, the timing table) beside each step's log; exits
# non-zero when a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

# Time limits in seconds. The default run's sum is at most 360 (tests/test_gpu_check.py checks it).
LIMITS_DEFAULT="deps=25 build=140 imports=20 tests=35 memcheck=30 racecheck=15 synccheck=15 initcheck=20 timing=20 train=40"
LIMITS_FULL="memcheck_all=240 racecheck_all=120 benchmark=240 train_50=240"

usage() {
  echo "usage: scripts/gpu_check.sh [--wheels DIR] [--full] [--setup-only] [OUTPUT_DIR]" >&2
  exit 2
}
WHEELS="" FULL=0 SETUP_ONLY=0 OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) [ $# -ge 2 ] || usage; WHEELS=$2; shift 2 ;;
    --wheels=*) WHEELS=${1#*=}; shift ;;
    --full) FULL=1; shift ;;
    --setup-only) SETUP_ONLY=1; shift ;;
    --print-limits)  # the default run's steps and limits, then their sum
      total=0
      for kv in $LIMITS_DEFAULT; do echo "${kv%%=*} ${kv#*=}"; total=$((total + ${kv#*=})); done
      echo "total $total"; exit 0 ;;
    -h|--help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) usage ;;
    *) [ -z "$OUT" ] || usage; OUT=$1; shift ;;
  esac
done

limit_of() {  # limit_of NAME: the step's limit from the tables above
  local kv
  for kv in $LIMITS_DEFAULT $LIMITS_FULL; do
    if [ "${kv%%=*}" = "$1" ]; then echo $(( ${kv#*=} * ${DK_GPU_CHECK_TIME_SCALE:-1} )); return; fi
  done
  echo "gpu_check: no time limit for step $1" >&2; exit 2
}

PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "gpu_check: $PY cannot import torch. Run it with the Python that holds torch:" >&2
  echo "  PYTHON=/path/to/python scripts/gpu_check.sh ..." >&2
  exit 2
fi
PY=$(command -v "$PY")
GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU ' \
   && "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  GPU=1
fi
if [ $GPU -eq 0 ] && [ $SETUP_ONLY -eq 0 ]; then
  echo "gpu_check: no GPU visible (nvidia-smi lists none, or torch sees none). This check needs a" >&2
  echo "machine with an NVIDIA GPU; --setup-only checks the set-up without one (CPU kernels)," >&2
  echo "and 'make test' compiles and emulates the CUDA kernels on a CPU machine. Nothing was run." >&2
  exit 2
fi

OUT="${OUT:-output/gpu_check}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPORT="$OUT/report.md"
DEPS="$ROOT/build/gpu_deps"
# Everything runs offline with the dependencies of build/gpu_deps before the host's own.
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONNOUSERSITE=1
export PYTHONPATH="$ROOT:$DEPS:$DEPS/detectron2-src${PYTHONPATH:+:$PYTHONPATH}"
export PY OUT ROOT DEPS WHEELS GPU
if [ -z "${CUDA_HOME:-}" ]; then
  for d in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /none/bin/nvcc)")")")" \
           /usr/local/cuda-13.0 /usr/local/cuda; do
    if [ -x "$d/bin/nvcc" ]; then export CUDA_HOME="$d"; break; fi
  done
fi
SANITIZER=""
for s in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-/none}/bin/compute-sanitizer" \
         /usr/local/cuda*/bin/compute-sanitizer; do
  if [ -n "$s" ] && [ -x "$s" ]; then SANITIZER=$s; break; fi
done

failures=0
started=$(date +%s)
STEPS="$OUT/steps.md"
: > "$STEPS"

# step NAME COMMAND...: runs COMMAND under the step's time limit, logs it to NAME.log, adds a line
# to the report.
step() {
  local name=$1 limit rc result t0 seconds log="$OUT/$1.log"; shift
  limit=$(limit_of "$name")
  t0=$(date +%s)
  echo "[gpu_check] $name (limit ${limit} s) ..."
  timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@" > "$log" 2>&1  # may be a function
  rc=$?
  seconds=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then result=PASS
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then result="FAIL (over its ${limit} s limit)"
  else result="FAIL (exit $rc)"; fi
  [ $rc -eq 0 ] || failures=$((failures + 1))
  echo "| $name | $result | $seconds | $limit | $name.log |" >> "$STEPS"
  echo "[gpu_check] $name: $result ($seconds s)"
  [ $rc -eq 0 ] || tail -n 15 "$log" | sed 's/^/    /'
  return $rc
}

# ---- set-up ------------------------------------------------------------------------------------
install_deps() {
  if [ -z "$WHEELS" ]; then
    # No wheels given: what an earlier run installed, or the host's own packages.
    "$PY" -c "import detectron2, fvcore, iopath, yacs, pycocotools, omegaconf, hydra, termcolor" \
      && { echo "Detectron2 and its dependencies found installed"; return 0; }
    echo "Detectron2 or a dependency is missing and no --wheels DIR was given: make the wheels on"
    echo "a machine with the package index (scripts/gpu_wheels.sh DIR --python-version X.Y, X.Y"
    echo "this host's Python) and pass --wheels DIR."
    return 1
  fi
  [ -d "$WHEELS" ] || { echo "--wheels $WHEELS: no such folder"; return 1; }
  local stamp
  stamp=$( (cd "$WHEELS" && ls -l -- *.whl | awk '{print $5, $NF}'; "$PY" -V) | sha1sum | cut -c1-40)
  if [ -f "$DEPS/.stamp" ] && [ "$(cat "$DEPS/.stamp")" = "$stamp" ]; then
    echo "build/gpu_deps is up to date with $WHEELS (reused)"; return 0
  fi
  rm -rf "$DEPS"
  mkdir -p "$DEPS"
  local others=()
  for w in "$WHEELS"/*.whl; do case "$(basename "$w")" in sal_detectron2-*) ;; *) others+=("$w") ;; esac; done
  "$PY" -m pip install --no-index --no-deps --no-compile --target "$DEPS" "${others[@]}" || return 1
  # Detectron2's sources from the sal-detectron2 wheel, as scripts/setup_env.sh installs them: a
  # Python 3.10 wheel whose files work on any Python 3; its top-level `tools` package would shadow
  # ours, so it goes.
  "$PY" -m pip install --no-index --no-deps --no-compile --only-binary=:all: --python-version 3.10 \
    --find-links "$WHEELS" --target "$DEPS/detectron2-src" sal-detectron2==0.7.2 || return 1
  rm -rf "$DEPS/detectron2-src/tools" "$DEPS/detectron2-src/bin"
  echo "$stamp" > "$DEPS/.stamp"
  echo "installed into $DEPS:"; ls "$DEPS"
}

build_extension() {
  if [ "$GPU" = 1 ] && [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    # The visible GPU only (setup.py's own detection would add PTX).
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
    export TORCH_CUDA_ARCH_LIST
  elif [ "$GPU" != 1 ]; then
    # No GPU (--setup-only on a CPU machine): the CPU kernels only, whatever DK_WITH_CUDA says in
    # the caller's environment (e.g. CI's); there is nothing to run CUDA code on, and a host
    # without a GPU may lack the CUDA runtime library to link against.
    export DK_WITH_CUDA=0
  fi
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  # torch builds with the ninja on PATH (else slowly, one file at a time): the one already there,
  # else the Python's own (pip's ninja package); one ninja keeps its build log across runs.
  if ! command -v ninja >/dev/null 2>&1; then
    local ninja_bin
    ninja_bin=$("$PY" -c "import ninja; print(ninja.BIN_DIR)" 2>/dev/null) && PATH="$ninja_bin:$PATH"
    command -v ninja >/dev/null 2>&1 || PATH="$PATH:$(dirname "$PY")"
  fi
  echo "CUDA_HOME=${CUDA_HOME:-none} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} MAX_JOBS=$MAX_JOBS"
  "$PY" setup.py build_ext --inplace
}

check_imports() {
  "$PY" - <<'EOF'
import importlib, os, sys
import torch
root, deps = os.environ["ROOT"], os.environ["DEPS"]
for name in ("torchvision", "numpy", "detectron2", "fvcore", "iopath", "yacs", "pycocotools",
             "omegaconf", "hydra", "dk_detectron2"):
    module = importlib.import_module(name)
    where = os.path.dirname(module.__file__)
    origin = ("build/gpu_deps" if where.startswith(deps) else "checkout" if where.startswith(root)
              else "host")
    print(f"{name} {getattr(module, '__version__', '?')} ({origin}: {where})")
from detectron2.config import get_cfg
from detectron2.modeling import build_model
import dk_detectron2
from dk_detectron2.layers import _extension, deform_kernel2d
print("dk_detectron2._C:", _extension.extension_path(), "CUDA kernels:", _extension.compiled_with_cuda())
gpu = os.environ.get("GPU") == "1"
device = "cuda" if gpu else "cpu"
cfg = get_cfg()
dk_detectron2.add_dk_config(cfg)
cfg.merge_from_file(os.path.join(root, "configs/COCO-InstanceSegmentation/mask_rcnn_dk_R_50_FPN_scratch_3x.yaml"))
cfg.MODEL.DEVICE = device
model = build_model(cfg)
print("DK Mask R-CNN built:", sum(p.numel() for p in model.parameters()), "parameters on", device)
x = torch.randn(2, 8, 9, 9, device=device, requires_grad=True)
w = torch.randn(8, 1, 5, 5, device=device, requires_grad=True)
r = torch.randn(2, 18, 9, 9, device=device, requires_grad=True)
deform_kernel2d(x, r, w, kernel_size=3, padding=1).sum().backward()
if gpu:
    assert _extension.compiled_with_cuda(), "dk_detectron2._C was built without the CUDA kernels"
    torch.cuda.synchronize()  # "no kernel image is available" would have raised above
    major, minor = torch.cuda.get_device_capability(0)
    print(f"the DK kernels ran on {torch.cuda.get_device_name(0)} (sm_{major}{minor})")
print("imports OK")
EOF
}

export -f install_deps build_extension check_imports
setup_ok=1
step deps install_deps || setup_ok=0
[ $setup_ok -eq 1 ] && { step build build_extension || setup_ok=0; }
[ $setup_ok -eq 1 ] && { step imports check_imports || setup_ok=0; }

# ---- checks on the GPU ---------------------------------------------------------------------------
run_cuda_tests() {
  "$PY" -m pytest -q -rfEs -p no:cacheprovider tests/test_ops_cuda.py tests/test_ops_cuda_grouped.py
  local rc=$?
  if [ $rc -eq 0 ] && grep -E '^SKIPPED' "$OUT/tests.log" | grep -vq 'needs two GPUs'; then
    echo "CUDA tests were skipped on a machine with a GPU"; return 3
  fi
  return $rc
}
# sanitize TOOL KERNEL_SUBSTRING [SANITIZER OPTIONS] [-- SCRIPT OPTIONS]: compute-sanitizer TOOL
# over scripts/gpu_check_ops.py, checking the kernels whose name holds KERNEL_SUBSTRING
# (`--kernel-name kns=`; the regex filter of Nsight Compute is another tool's syntax), the caching
# allocator off so that every tensor is its own allocation (exact bounds, initcheck).
sanitize() {
  local tool=$1 kernels=$2; shift 2
  local options=() script=()
  while [ $# -gt 0 ]; do
    if [ "$1" = "--" ]; then shift; script=("$@"); break; fi
    options+=("$1"); shift
  done
  local filter=(--kernel-name "kns=$kernels")
  # compute-sanitizer before 2022 called the option --kernel-regex (same kns= syntax)
  "$SANITIZER" --help 2>/dev/null | grep -q -- '--kernel-name ' || filter=(--kernel-regex "kns=$kernels")
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 1 "${filter[@]}" \
    "${options[@]}" "$PY" scripts/gpu_check_ops.py "${script[@]}"
}
export -f run_cuda_tests sanitize
export SANITIZER

if [ $SETUP_ONLY -eq 0 ] && [ $setup_ok -eq 1 ]; then
  step tests run_cuda_tests
  if [ -n "$SANITIZER" ]; then
    step memcheck sanitize memcheck dk_detectron2 --leak-check no
    step racecheck sanitize racecheck dk_grad_weight_partial --racecheck-report hazard
    step synccheck sanitize synccheck dk_grad_weight_partial
    step initcheck sanitize initcheck dk_detectron2
  else
    echo "| compute-sanitizer | FAIL (not found: set CUDA_HOME to the toolkit) | 0 | | |" >> "$STEPS"
    failures=$((failures + 1))
  fi
  step timing "$PY" scripts/gpu_check_bench.py --budget 15 --markdown "$OUT/timing.md" \
    --json "$OUT/timing.json"
  step train "$PY" scripts/gpu_check_train.py --iters 20 --budget 34 --markdown "$OUT/train.md" \
    --json "$OUT/train.json"
  if [ $FULL -eq 1 ]; then
    [ -n "$SANITIZER" ] && step memcheck_all sanitize memcheck dk_detectron2 --leak-check no -- --all-dtypes
    [ -n "$SANITIZER" ] && step racecheck_all sanitize racecheck dk_detectron2 --racecheck-report hazard
    step benchmark "$PY" -m benchmarks --cuda --no-progress --output "$OUT/benchmark"
    step train_50 "$PY" scripts/gpu_check_train.py --iters 50 --warmup 10 --budget 220 \
      --markdown "$OUT/train_50.md" --json "$OUT/train_50.json"
  fi
fi

# ---- report ------------------------------------------------------------------------------------
total=$(( $(date +%s) - started ))
{
  echo "# dk_detectron2 GPU check"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (+ local changes)')"
  echo "- run: $([ $SETUP_ONLY -eq 1 ] && echo 'set-up only' || { [ $FULL -eq 1 ] && echo full || echo default; }), $total s in all, $failures step(s) failed"
  if [ $GPU -eq 1 ]; then
    echo "- GPU: $(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader | head -1)"
  else
    echo "- GPU: none visible"
  fi
  "$PY" -c "
import platform, torch
print(f'- Python {platform.python_version()}; torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})')" 2>/dev/null
  echo "- nvcc: $("${CUDA_HOME:-/none}/bin/nvcc" --version 2>/dev/null | grep -o 'release [^,]*' || echo none); compute-sanitizer: $("$SANITIZER" --version 2>/dev/null | grep -o 'Version .*' | head -1 || echo none)"
  [ -f "$OUT/imports.log" ] && grep -E '^(detectron2|fvcore|dk_detectron2._C|the DK kernels)' "$OUT/imports.log" | sed 's/^/- /'
  echo
  echo "| step | result | seconds | limit | log |"
  echo "| --- | --- | --- | --- | --- |"
  cat "$STEPS"
  if [ -f "$OUT/tests.log" ] && grep -qE '^(FAILED|ERROR) ' "$OUT/tests.log"; then
    echo; echo "Failing tests:"; echo
    grep -E '^(FAILED|ERROR) ' "$OUT/tests.log" | head -n 40 | sed 's/^/    /'
  fi
  summaries=$(grep -H 'ERROR SUMMARY' "$OUT"/*check*.log 2>/dev/null)
  if [ -n "$summaries" ]; then
    echo; echo "Sanitizers:"; echo
    echo "$summaries" | sed "s|^$OUT/||; s/^/    /"
  fi
  for part in timing train train_50; do
    if [ -f "$OUT/$part.md" ]; then echo; cat "$OUT/$part.md"; fi
  done
} > "$REPORT"
echo "[gpu_check] report: $REPORT ($total s, $failures step(s) failed)"
[ "$failures" -eq 0 ] && [ $setup_ok -eq 1 ]
