"""The CUDA kernels of csrc/cuda, emulated on the CPU and built with AddressSanitizer.

scripts/cuda_emulation/ rewrites the real .cu sources into host C++ (one fiber per CUDA thread,
several blocks interleaved, the real launch limits) and runs the case matrix of its cases.py
against the pure-PyTorch reference: every operator and gradient, depthwise and grouped/full
weights, both memory formats, four dtypes, empty and one-pixel shapes, non-finite values,
multi-pass scopes, the non-determinism alerts and the emulator's own checks. All cases run in one
child process (ASan must be preloaded); each case is reported here as its own test. The build is
cached in build/cuda_emulation and redone only when a source changes.
"""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATION = os.path.join(REPO, "scripts", "cuda_emulation")
sys.path.insert(0, EMULATION)
import cases  # noqa: E402  (the case list; needs torch only)

pytestmark = pytest.mark.slow
CASE_NAMES = [case.name for case in cases.all_cases()]


def _env():
    return dict(os.environ, DK_EMU_DIR=os.environ.get(
        "DK_EMU_DIR", os.path.join(REPO, "build", "cuda_emulation")))


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    report_path = str(tmp_path_factory.mktemp("emulation") / "report.json")
    proc = subprocess.run([sys.executable, os.path.join(EMULATION, "check.py"), "--json",
                           report_path], env=_env(), capture_output=True, text=True, timeout=3000)
    report = None
    if os.path.exists(report_path):
        with open(report_path) as f:
            report = json.load(f)
    return proc, report


def test_the_whole_matrix_ran_without_memory_errors(emulation):
    proc, report = emulation
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert "ERROR: AddressSanitizer" not in proc.stderr, tail
    assert report is not None and report["complete"], f"the emulation stopped early:\n{tail}"
    assert set(report["results"]) == set(CASE_NAMES)
    assert report["launches"] > len(CASE_NAMES)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_case(emulation, name):
    _, report = emulation
    assert report is not None and name in report["results"], "the emulation did not reach this case"
    result = report["results"][name]
    assert result["ok"], "; ".join(result["errors"])


def test_address_sanitizer_catches_a_shared_memory_overrun(emulation):
    """The sanitizer is really there: a kernel writing one float past its block's shared memory
    aborts the run with ASan's report."""
    proc = subprocess.run([sys.executable, os.path.join(EMULATION, "check.py"), "--overrun"],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "AddressSanitizer: heap-buffer-overflow" in proc.stderr, proc.stderr[-3000:]
    assert "shared_overrun_kernel" in proc.stderr
