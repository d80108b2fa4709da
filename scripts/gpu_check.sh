#!/usr/bin/env bash
# The whole CUDA check in one command, for a machine with a GPU (about 8 minutes once .venv exists):
#
#   scripts/gpu_check.sh [OUTPUT_DIR]          (default output/gpu_check; run from anywhere)
#
#  1. set-up: builds the CUDA kernels for the visible GPU (setup.py's detection; no
#     TORCH_CUDA_ARCH_LIST needed) and checks the library holds code for it;
#  2. tests/test_ops_cuda.py and tests/test_ops_cuda_grouped.py (CUDA vs CPU, every path, dtype);
#  3. compute-sanitizer memcheck over scripts/gpu_check_ops.py (every op forward + backward in
#     every dtype), and racecheck + synccheck over it (the shared-memory weight-gradient kernel);
#  4. the benchmark's CUDA section (python -m benchmarks --cuda --quick);
#  5. 50 training iterations of the DK Mask R-CNN and of its rigid baseline, float32 and AMP:
#     losses finite, DK at most 1.3x the rigid model's iteration time.
# Writes OUTPUT_DIR/report.md (one line per step, PASS/FAIL, time) beside each step's log, and
# exits non-zero when a step failed. Without a visible GPU it stops at once and says so.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  echo "gpu_check: no GPU visible (nvidia-smi lists none). This check needs a machine with an" >&2
  echo "NVIDIA GPU and its driver; on a CPU-only machine run 'make test' (the CUDA kernels are" >&2
  echo "compiled and emulated there). Nothing was run." >&2
  exit 2
fi
OUT="${1:-output/gpu_check}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPORT="$OUT/report.md"
PY="$ROOT/.venv/bin/python"

failures=0
started=$(date +%s)
{
  echo "# dk_detectron2 GPU check"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- GPU: $(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader | head -1)"
  echo
  echo "| step | result | seconds | log |"
  echo "| --- | --- | --- | --- |"
} > "$REPORT"

# step NAME TIMEOUT_S COMMAND...: runs COMMAND with a time limit, logs it, adds a report line.
step() {
  local name=$1 limit=$2; shift 2
  local log="$OUT/$name.log" t0 rc result
  t0=$(date +%s)
  echo "[gpu_check] $name ..."
  timeout "$limit" bash -c '"$@"' step "$@" > "$log" 2>&1  # "$@" may be an exported function
  rc=$?
  if [ $rc -eq 0 ]; then result=PASS
  elif [ $rc -eq 124 ]; then result="FAIL (over ${limit} s)"
  else result="FAIL (exit $rc)"; fi
  [ $rc -eq 0 ] || failures=$((failures + 1))
  echo "| $name | $result | $(( $(date +%s) - t0 )) | $name.log |" >> "$REPORT"
  echo "[gpu_check] $name: $result ($(( $(date +%s) - t0 )) s)"
  [ $rc -eq 0 ] || tail -n 15 "$log" | sed 's/^/    /'
  return $rc
}

# 1. Set-up for the visible GPU, and proof that the library has code for it.
step setup 900 env MAX_JOBS="${MAX_JOBS:-$(nproc)}" bash scripts/setup_env.sh || {
  echo "[gpu_check] the set-up failed: nothing else can run (see $OUT/setup.log)"; exit 1; }
step arch 120 "$PY" - <<'EOF'
import os, shutil, subprocess, torch
from dk_detectron2.layers import _extension
assert _extension.compiled_with_cuda(), "dk_detectron2._C was built without the CUDA kernels"
major, minor = torch.cuda.get_device_capability(0)
so = _extension.extension_path()
tool = shutil.which("cuobjdump") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                 "bin", "cuobjdump")
if os.path.exists(tool):
    listing = subprocess.run([tool, "--list-elf", "--list-ptx", so], capture_output=True,
                             text=True).stdout
    print(listing)
    print(f"sm_{major}{minor} code in the library: {f'sm_{major}{minor}' in listing}")
# The proof that counts: a kernel runs ("no kernel image is available" would raise here).
x = torch.randn(1, 4, 5, 5, device="cuda")
w = torch.randn(4, 1, 4, 4, device="cuda")
r = torch.zeros(1, 18, 5, 5, device="cuda")
torch.ops.dk_detectron2.deform_kernel2d(x, r, w, [3, 3], [1, 1], [1, 1], [1, 1], 1)
torch.cuda.synchronize()
print(f"kernels run on {torch.cuda.get_device_name(0)} (sm_{major}{minor})")
EOF

# 2. The CUDA tests (a skip here means the GPU was not used: counted as a failure).
run_cuda_tests() {
  "$PY" -m pytest -q -rs tests/test_ops_cuda.py tests/test_ops_cuda_grouped.py
  local rc=$?
  if [ $rc -eq 0 ] && grep 'SKIPPED' "$OUT/tests.log" | grep -vq 'needs two GPUs'; then
    echo "CUDA tests were skipped on a machine with a GPU"; return 3
  fi
  return $rc
}
export -f run_cuda_tests
export PY OUT
step tests 300 run_cuda_tests

# 3. compute-sanitizer: every op, every dtype; no caching allocator, so bounds are exact.
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$SANITIZER" ]; then
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  step memcheck 420 "$SANITIZER" --tool memcheck --error-exitcode 1 --leak-check no \
    "$PY" scripts/gpu_check_ops.py --quick
  step racecheck 300 "$SANITIZER" --tool racecheck --racecheck-report hazard --error-exitcode 1 \
    --kernel-name regex:dk_grad_weight "$PY" scripts/gpu_check_ops.py --quick
  step synccheck 300 "$SANITIZER" --tool synccheck --error-exitcode 1 \
    --kernel-name regex:dk_grad_weight "$PY" scripts/gpu_check_ops.py --quick
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
else
  echo "| compute-sanitizer | FAIL (not found in the CUDA toolkit) | 0 | |" >> "$REPORT"
  failures=$((failures + 1))
fi

# 4. The benchmark's CUDA section.
step benchmark 300 "$PY" -m benchmarks --cuda --quick --no-progress \
  --output "$OUT/benchmark"

# 5. Training on the GPU, float32 and AMP, DK vs the rigid baseline.
step train 420 "$PY" scripts/gpu_check_train.py --iters 50 --json "$OUT/train.json"
grep -e 'median' -e 'DK / rigid' "$OUT/train.log" | sed 's/^/    /' >> "$REPORT"

total=$(( $(date +%s) - started ))
{
  echo
  if [ -f "$OUT/benchmark/results.md" ]; then echo "Benchmark: benchmark/results.md"; fi
  echo "Total: ${total} s; $failures step(s) failed."
} >> "$REPORT"
echo "[gpu_check] report: $REPORT (${total} s, $failures failed)"
[ "$failures" -eq 0 ]
