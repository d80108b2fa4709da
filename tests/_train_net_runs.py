"""Running tests/train_net_driver.py (train_net.py with tiny datasets) in fresh processes: the
environment and the runner that the train_net, distributed and fault-tolerance tests share."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")


def driver_env(datasets):
    """The environment of a driver process: its tiny datasets under ``datasets``, 1 thread per
    process, unbuffered output, the repository importable."""
    env = dict(os.environ, DK_TEST_DATASETS=str(datasets), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO] + env.get("PYTHONPATH", "").split(os.pathsep))
    return env


def run_driver(datasets, *args, check=True):
    """Runs tests/train_net_driver.py (train_net.py + tiny datasets) in a fresh process."""
    proc = subprocess.run(
        [sys.executable, os.path.join(TESTS, "train_net_driver.py"), *args],
        env=driver_env(datasets), cwd=REPO, capture_output=True, text=True, timeout=540,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train_net failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc
