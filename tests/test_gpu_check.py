"""scripts/gpu_check.sh and scripts/gpu_wheels.sh on a CPU machine: the default run's time limits,
the sanitizer options, and the offline set-up (--setup-only) on a simulated GPU host: a Python that
holds torch but not Detectron2, fvcore, iopath, yacs, pycocotools, omegaconf, hydra-core, termcolor
or antlr4, pip told never to reach an index, and the wheels folder of gpu_wheels.sh."""
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_check.sh")
WHEELS_SCRIPT = os.path.join(REPO, "scripts", "gpu_wheels.sh")
# What the GPU host lacks (its python3 holds torch, torchvision, numpy, PyYAML, tqdm, ... only).
MISSING_ON_HOST = ("detectron2", "fvcore", "iopath", "yacs", "pycocotools", "omegaconf", "hydra",
                   "termcolor", "antlr4")


def _script():
    with open(SCRIPT) as f:
        return f.read()


def _limits(table):
    line = re.search(rf'^{table}="([^"]*)"', _script(), re.M)
    assert line, f"{table} not found in scripts/gpu_check.sh"
    return {k: int(v) for k, v in (kv.split("=") for kv in line.group(1).split())}


def test_default_run_limits_sum_to_six_minutes_at_most():
    limits = _limits("LIMITS_DEFAULT")
    assert sum(limits.values()) <= 360, limits
    printed = subprocess.run(["bash", SCRIPT, "--print-limits"], capture_output=True, text=True,
                             check=True).stdout.split("\n")
    assert printed[-2] == f"total {sum(limits.values())}"
    assert {line.split()[0] for line in printed[:-2]} == set(limits)


def test_every_step_has_a_limit_and_the_default_run_runs_each_default_step():
    code = [line for line in _script().splitlines() if not line.lstrip().startswith("#")]
    called = {m for line in code for m in re.findall(r"(?:^|[\s{])step ([a-z0-9_]+) ", line)}
    default, full = _limits("LIMITS_DEFAULT"), _limits("LIMITS_FULL")
    assert called == set(default) | set(full)
    assert not set(default) & set(full)
    assert set(default) == {"deps", "build", "imports", "tests", "memcheck", "racecheck",
                            "synccheck", "initcheck", "timing", "train"}


def test_sanitizer_steps_use_compute_sanitizer_syntax():
    """compute-sanitizer filters kernels with --kernel-name kns=...; `regex:` is Nsight Compute's
    syntax and would make racecheck/synccheck fail or check nothing."""
    text = _script()
    assert "regex:" not in text
    assert '--kernel-name "kns=$kernels"' in text
    for tool in ("memcheck", "racecheck", "synccheck", "initcheck"):
        assert re.search(rf"step {tool} sanitize {tool} \w+", text), tool
    assert re.search(r"step racecheck sanitize racecheck dk_grad_weight_partial", text)


def test_the_cuda_build_carries_line_information():
    with open(os.path.join(REPO, "setup.py")) as f:
        assert '"-lineinfo"' in f.read()


def test_without_a_gpu_the_full_check_refuses_at_once(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("a GPU driver is installed here")
    proc = subprocess.run(["bash", SCRIPT, str(tmp_path / "out")], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable), timeout=120)
    assert proc.returncode == 2
    assert "no GPU visible" in proc.stderr and "--setup-only" in proc.stderr


# ------------------------------------------------------------------------------------------------
# The simulated offline host
# ------------------------------------------------------------------------------------------------
SITECUSTOMIZE = '''"""The simulated GPU host: this venv's packages minus those the host lacks."""
import importlib.machinery
import os
import sys

HIDDEN = {hidden!r}
VENV = {venv!r}
# Detectron2's sources enter this venv through a .pth file: the host has no such thing.
sys.path[:] = [p for p in sys.path if not p.startswith(os.path.join(VENV, "detectron2-src"))]


class _Hide:
    """A hidden package imports only from outside the venv (build/gpu_deps, say)."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if "." in name or name not in HIDDEN:
            return None
        elsewhere = [p for p in sys.path if p and not os.path.abspath(p).startswith(VENV)]
        spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {{name!r}} (simulated GPU host)",
                                      name=name)
        return spec


sys.meta_path.insert(0, _Hide)
'''


def _simulated_host(tmp_path):
    """`python`: this venv's interpreter (so torch, its headers and the compile commands are the
    very same, and the in-place build is reused) behind a sitecustomize that hides the packages
    a GPU host lacks; pip, setuptools, numpy, ... stay, as on the host."""
    venv = os.path.dirname(os.path.dirname(os.path.abspath(sys.executable)))
    host = tmp_path / "host"
    (host / "bin").mkdir(parents=True)
    (host / "shim").mkdir()
    (host / "shim" / "sitecustomize.py").write_text(
        SITECUSTOMIZE.format(hidden=MISSING_ON_HOST, venv=venv))
    python = host / "bin" / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{host / "shim"}${{PYTHONPATH:+:$PYTHONPATH}}" '
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    probe = subprocess.run([str(python), "-c", "import setuptools, torch\n"
                            "for name in " + repr(MISSING_ON_HOST) + ":\n"
                            "    try:\n        __import__(name)\n"
                            "    except ImportError:\n        continue\n"
                            "    print('importable:', name)\nprint('ok')"],
                           capture_output=True, text=True, cwd=str(tmp_path))
    assert probe.returncode == 0 and probe.stdout.strip() == "ok", probe.stdout + probe.stderr
    return python


def _wheels():
    """The wheels folder: $DK_GPU_WHEELS, or build/gpu_wheels-<python> made by gpu_wheels.sh
    (it needs the package index once; the folder is reused after)."""
    if os.environ.get("DK_GPU_WHEELS"):
        return os.environ["DK_GPU_WHEELS"]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    folder = os.path.join(REPO, "build", f"gpu_wheels-{version}")
    if not os.path.isdir(folder) or not any(n.startswith("sal_detectron2") for n in
                                            os.listdir(folder)):
        proc = subprocess.run(["bash", WHEELS_SCRIPT, folder, "--python-version", version],
                              capture_output=True, text=True, timeout=900,
                              env=dict(os.environ, PYTHON=sys.executable))
        if proc.returncode != 0:
            shutil.rmtree(folder, ignore_errors=True)
            if "Could not" in proc.stderr or "Network" in proc.stderr or "resolve" in proc.stderr:
                pytest.skip("no package index reachable to make the wheels: "
                            + proc.stderr[-300:])
            raise AssertionError(proc.stdout + proc.stderr)
    return folder


@pytest.mark.slow
def test_setup_only_passes_on_a_simulated_offline_host(tmp_path):
    wheels = _wheels()
    size = sum(os.path.getsize(os.path.join(wheels, n)) for n in os.listdir(wheels))
    assert size <= 30 * 2**20, f"{size / 2**20:.1f} MiB of wheels"
    python = _simulated_host(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    # A 2-core machine may rebuild the CPU kernels here (the limits are set for 16 cores).
    env.update(PYTHON=str(python), PIP_NO_INDEX="1", PIP_FIND_LINKS="", MAX_JOBS="1",
               DK_GPU_CHECK_TIME_SCALE="10")
    out = tmp_path / "out"
    command = ["bash", SCRIPT, "--wheels", wheels, "--setup-only", str(out)]
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1500)
    report = (out / "report.md").read_text() if (out / "report.md").exists() else ""
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:] + report
    for name in ("deps", "build", "imports"):
        assert re.search(rf"^\| {name} \| PASS \| \d+ \| \d+ \|", report, re.M), report
    imports = (out / "imports.log").read_text()
    for name in ("detectron2", "fvcore", "iopath", "yacs", "pycocotools", "omegaconf", "hydra"):
        assert re.search(rf"^{name} \S+ \(build/gpu_deps:", imports, re.M), imports
    assert "DK Mask R-CNN built" in imports and "imports OK" in imports
    assert not os.path.exists(os.path.join(REPO, "build", "gpu_deps", "detectron2-src", "tools"))
    assert "- Python" in report and "torch" in report
    # A second run reuses the installed wheels and the build.
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "reused" in (out / "deps.log").read_text()
    assert "ninja: no work to do" in (out / "build.log").read_text()
