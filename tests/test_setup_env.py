"""scripts/setup_env.sh refuses a disk too small for a new environment before it installs anything."""

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_setup(checkout: Path, min_free_gib: str) -> subprocess.CompletedProcess:
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup_env.sh", checkout / "scripts")
    shutil.copy(ROOT / "requirements.txt", checkout)
    # PYTHON=false: if the script gets past the disk check, creating the venv fails at once.
    env = dict(os.environ, DK_SETUP_MIN_FREE_GIB=min_free_gib, PYTHON="false")
    return subprocess.run(
        ["bash", "scripts/setup_env.sh"], cwd=checkout, env=env, capture_output=True, text=True,
        timeout=60,
    )


def test_too_little_free_space_is_refused_before_the_venv_is_created(tmp_path):
    result = _run_setup(tmp_path, min_free_gib="1000000")
    assert result.returncode == 1
    assert "not enough disk space" in result.stderr
    assert "1000000 GiB free (DK_SETUP_MIN_FREE_GIB)" in result.stderr
    assert "MiB free" in result.stderr
    assert not (tmp_path / ".venv").exists()


def test_enough_free_space_goes_on_to_create_the_venv(tmp_path):
    result = _run_setup(tmp_path, min_free_gib="0.001")
    assert "not enough disk space" not in result.stderr
    assert "[setup] creating" in result.stdout
    assert result.returncode != 0  # PYTHON=false cannot create it
