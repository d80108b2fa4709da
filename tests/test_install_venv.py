"""The README's install line in a fresh virtual environment, with the pip that ``python -m venv``
ships (23.2 with Python 3.11 and 3.12) and with the current pip: editable and wheel installs.

Why: ``pip install torch`` brings setuptools >= 77; without ``pyproject.toml``, pip 23.2 runs
``pip install --no-build-isolation -e .`` as the legacy ``setup.py develop``, which current
setuptools hands back to pip *with* build isolation, and the build fails with "No module named
'torch'". ``pyproject.toml`` makes every pip take the PEP 517/660 route, which honours
``--no-build-isolation``.

One environment, torch installed into it once (``pip install torch==<this torch>``, from the
package index pip is configured with; the test skips if that fails), one source copy: the four
builds (pip 23.2 editable and wheel, then the upgraded pip's) compile once and reuse the objects.
``--no-deps`` keeps Detectron2 and the other run-time dependencies out (the check loads the
compiled operator library and calls it, without importing the package)."""
import glob
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from test_packaging import _copy_sources

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

_CHECK = textwrap.dedent("""
    import glob, importlib.util, os, sys, torch
    where = sys.argv[1]
    spec = importlib.util.find_spec("dk_detectron2")
    package = os.path.dirname(spec.origin)
    assert package.startswith(where), (package, where)
    (library,) = glob.glob(os.path.join(package, "_C*.so"))
    torch.ops.load_library(library)
    x, w = torch.randn(1, 4, 6, 6), torch.randn(4, 1, 3, 3)
    out = torch.ops.dk_detectron2.deform_kernel2d(x, torch.zeros(1, 18, 6, 6), w, [3, 3], [1, 1],
                                                  [1, 1], [1, 1], 1)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, w, padding=1, groups=4))
    print("OK", package)
""")


def _run(args, **kwargs):
    proc = subprocess.run(args, capture_output=True, text=True, timeout=1800, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, args))}:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc.stdout


def test_readme_install_with_the_bundled_and_the_current_pip(tmp_path):
    venv, source, wheels = tmp_path / "venv", tmp_path / "src", tmp_path / "wheels"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(DK_WITH_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    _run([sys.executable, "-m", "venv", str(venv)], env=env)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip"]
    bundled = _run(pip + ["--version"], env=env)
    assert bundled.startswith("pip 23."), bundled  # what a new venv ships (Python 3.11, 3.12)
    wanted_torch = torch.__version__.split("+")[0]
    installed = subprocess.run(pip + ["install", "-q", f"torch=={wanted_torch}"], env=env,
                               capture_output=True, text=True, timeout=1800)
    if installed.returncode != 0:
        pytest.skip(f"torch {wanted_torch} cannot be installed here: {installed.stderr[-500:]}")
    _run(pip + ["install", "-q", "setuptools", "wheel", "ninja"], env=env)
    setuptools = _run([python, "-c", "import setuptools; print(setuptools.__version__)"], env=env)
    assert int(setuptools.split(".")[0]) >= 77, setuptools  # what makes the legacy route fail
    _copy_sources(str(source))
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                env=env).strip()

    for round_ in ("bundled", "current"):
        if round_ == "current":
            _run(pip + ["install", "-q", "--upgrade", "pip"], env=env)
            assert not _run(pip + ["--version"], env=env).startswith("pip 23.")
        # the README's line (with --no-deps: Detectron2 and the rest are not needed here)
        _run(pip + ["install", "--no-build-isolation", "--no-deps", "-e", str(source)],
             env=env, cwd=str(source))
        assert _run([python, "-c", _CHECK, str(source)], env=env, cwd=str(tmp_path)).startswith(
            "OK")
        _run(pip + ["uninstall", "-y", "dk_detectron2"], env=env)
        for built in glob.glob(str(source / "dk_detectron2" / "_C*.so")):
            os.remove(built)  # the wheel must carry its own
        _run(pip + ["wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(wheels),
                    str(source)], env=env)
        (wheel,) = glob.glob(str(wheels / "dk_detectron2-*.whl"))
        _run(pip + ["install", "--no-deps", "-q", wheel], env=env)
        assert _run([python, "-c", _CHECK, site], env=env, cwd=str(tmp_path)).startswith("OK")
        _run(pip + ["uninstall", "-y", "dk_detectron2"], env=env)
        os.remove(wheel)
