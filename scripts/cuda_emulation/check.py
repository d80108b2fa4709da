"""Runs the CUDA kernels, emulated on the CPU under AddressSanitizer, over the case matrix.

    python scripts/cuda_emulation/check.py [--json REPORT] [--only SUBSTRING] [--no-asan]

Builds the rewritten ``csrc/cuda`` sources (make_emu.py) with ``-fsanitize=address`` into
``$DK_EMU_DIR`` (default /tmp/dk_cuda_emulation; rebuilt only when a source changes), then runs
every case of ``cases.py`` in a child process that preloads the AddressSanitizer runtime: each
output and gradient is compared with ``dk_detectron2.layers.reference`` in float64, deterministic
gradients must be bitwise equal under a second (shuffled) schedule, and any memory error aborts
the child with ASan's report. Exit status 0 when every case passed.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import make_emu  # noqa: E402

WORK = os.environ.get("DK_EMU_DIR", "/tmp/dk_cuda_emulation")
ASAN_FLAGS = ["-fsanitize=address", "-fno-omit-frame-pointer"]
ASAN_OPTIONS = "detect_leaks=0:abort_on_error=1:detect_stack_use_after_return=0"


def asan_preload() -> str:
    """LD_PRELOAD for an ASan-instrumented library in python: the ASan runtime first, then
    libstdc++ (so that ASan can intercept C++ exceptions thrown by the library)."""
    paths = []
    for lib in ("libasan.so", "libstdc++.so"):
        path = subprocess.run(["g++", f"-print-file-name={lib}"], capture_output=True, text=True,
                              check=True).stdout.strip()
        if not os.path.isabs(path) or not os.path.exists(path):
            raise RuntimeError(f"g++ cannot find {lib} (needed for AddressSanitizer), got {path!r}")
        paths.append(os.path.realpath(path))
    return ":".join(paths)


def build(asan: bool = True) -> None:
    """Generates, compiles (when a source changed) and loads the emulated kernels. With ASan the
    calling process must already have the ASan runtime preloaded."""
    import torch.utils.cpp_extension as ext

    src = make_emu.generate(WORK)
    sources = [os.path.join(src, "cuda", n) for n in sorted(os.listdir(os.path.join(src, "cuda")))
               if n.endswith(".cpp")] + [os.path.join(HERE, "emu_selftest.cpp")]
    flags = ["-O1", "-g", "-std=c++20", "-w"] + (ASAN_FLAGS if asan else [])
    name = "dk_emu_asan" if asan else "dk_emu_plain"
    build_dir = os.path.join(WORK, "build_" + name)
    os.makedirs(build_dir, exist_ok=True)
    preload = os.environ.pop("LD_PRELOAD", None)  # the compilers need not run under ASan
    try:
        ext.load(name=name, sources=sources, extra_cflags=flags,
                 extra_ldflags=ASAN_FLAGS if asan else [], extra_include_paths=[src, HERE],
                 build_directory=build_dir, is_python_module=False, verbose=False)
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload


def run_cases(only: str, report_path: str) -> int:
    """Every selected case, the report rewritten as each finishes; 1 if any failed."""
    import torch

    import cases

    torch.set_num_threads(1)
    results = {}
    selected = [c for c in cases.all_cases() if only in c.name]
    t0 = time.time()
    for case in selected:
        start = time.time()
        try:
            errors = case.run()
        except Exception as e:  # a failed TORCH_CHECK or launch limit is a failed case
            errors = [f"{type(e).__name__}: {e}"]
        results[case.name] = {"ok": not errors, "errors": errors,
                              "seconds": round(time.time() - start, 3)}
        print(("ok   " if not errors else "FAIL ") + case.name + ("" if not errors else
              "  " + "; ".join(errors)), flush=True)
        with open(report_path, "w") as f:
            json.dump({"complete": False, "results": results}, f, indent=1)
    failed = sum(not r["ok"] for r in results.values())
    with open(report_path, "w") as f:
        json.dump({"complete": True, "results": results, "launches": torch.ops.dk_emu.launches(),
                   "seconds": round(time.time() - t0, 1)}, f, indent=1)
    print(f"{len(results) - failed}/{len(results)} cases passed, "
          f"{torch.ops.dk_emu.launches()} emulated launches, {time.time() - t0:.0f} s")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=os.path.join(WORK, "report.json"))
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--no-asan", action="store_true", help="build and run without ASan")
    parser.add_argument("--build-only", action="store_true", help="compile, run nothing")
    parser.add_argument("--overrun", action="store_true",
                        help="write past a block's shared memory: ASan must abort the run")
    args = parser.parse_args()
    asan = not args.no_asan
    if asan and "libasan" not in os.environ.get("LD_PRELOAD", ""):
        # Re-run this script with the ASan runtime loaded first, as an instrumented library needs.
        # exec, not a child: a caller's timeout or kill reaches the process doing the work.
        env = dict(os.environ, LD_PRELOAD=asan_preload(), ASAN_OPTIONS=ASAN_OPTIONS)
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)
    build(asan)
    if args.build_only:
        return 0
    if args.overrun:
        import torch

        torch.ops.dk_emu.selftest_shared_overrun(4)
        print("the shared-memory overrun went unnoticed")
        return 0
    return run_cases(args.only, args.json)


if __name__ == "__main__":
    sys.exit(main())
