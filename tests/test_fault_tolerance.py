"""Training that survives faults, end to end with ``train_net.py`` on the CPU (1 thread per
process):

- a run SIGKILLed inside an iteration, inside a checkpoint save and inside the final evaluation,
  and resumed with ``--resume`` after each kill, ends with the uninterrupted run's weights (bit
  for bit), metrics and evaluation results; with 1 process and with 2 gloo processes;
- a kill inside a save leaves the previous checkpoint and ``last_checkpoint`` intact;
- a 2-process job whose worker raises, is killed, or stops answering exits non-zero within
  seconds, with the failing worker's error in its output.

Faults are injected by ``tests/train_net_driver.py`` (``$DK_TEST_FAULT``).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
sys.path.insert(0, TESTS)

from test_train_net import _env, run_driver  # noqa: E402
from train_net_driver import CONFIG, TINY_OPTS  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# 6 iterations, a checkpoint after every second one, the final evaluation on 4 images.
SCHEDULE = TINY_OPTS + [
    "DATASETS.TRAIN", "('dk_shapes_tiny_train',)", "DATASETS.TEST", "('dk_shapes_tiny_val',)",
    "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2", "SEED", "5",
]
# Logged values that measure the machine, not the training.
TIMING_KEYS = {"time", "data_time", "rank_data_time", "eta_seconds"}


def _command(num_processes, out, resume):
    return [sys.executable, os.path.join(TESTS, "train_net_driver.py"), "--config-file", CONFIG,
            "--num-processes", str(num_processes), "--dist-url", "auto",
            *(["--resume"] if resume else []), *SCHEDULE, "OUTPUT_DIR", str(out)]


def _run_until_fault(datasets, command, fault, kill=True, timeout=300):
    """Starts ``command`` with ``fault`` injected; when the driver reports it, SIGKILLs the whole
    process group if ``kill``. Returns (output, return code, seconds from the fault to the exit)."""
    proc = subprocess.Popen(
        command, env=dict(_env(datasets), DK_TEST_FAULT=fault), cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    lines, fault_time, deadline = [], None, time.monotonic() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if fault_time is None and line.startswith("DK_TEST_FAULT"):
                fault_time = time.monotonic()
                if kill:
                    os.killpg(proc.pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                break
        returncode = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = "".join(lines)
    assert fault_time is not None, f"the fault {fault!r} never happened:\n{output[-3000:]}"
    return output, returncode, time.monotonic() - fault_time


def _final_state(out):
    """Weights, metrics (the last record per iteration, timing left out) and evaluation results."""
    model = torch.load(out / "model_final.pth", weights_only=False)["model"]
    metrics = {}
    with open(out / "metrics.json") as f:
        for line in f:
            record = json.loads(line)
            metrics[record["iteration"]] = {k: v for k, v in record.items()
                                            if k not in TIMING_KEYS}
    with open(out / "eval_results.json") as f:
        results = json.load(f)
    return model, metrics, results


def _assert_same_run(resumed, uninterrupted):
    model, metrics, results = resumed
    expected_model, expected_metrics, expected_results = uninterrupted
    assert model.keys() == expected_model.keys()
    different = [k for k in model if not torch.equal(model[k], expected_model[k])]
    assert not different, f"{len(different)} tensors differ, first: {different[:3]}"
    # Losses are logged as medians over the last 20 iterations: equal only if the history was
    # restored too. NaN (an AP of an absent size) is not equal to itself: compare as JSON text.
    assert metrics.keys() == expected_metrics.keys()
    for iteration, record in metrics.items():
        expected = expected_metrics[iteration]
        different = {k: (record.get(k), expected.get(k)) for k in set(record) | set(expected)
                     if json.dumps(record.get(k)) != json.dumps(expected.get(k))}
        assert not different, f"iteration {iteration}: (resumed, uninterrupted) {different}"
    assert json.dumps(results, sort_keys=True) == json.dumps(expected_results, sort_keys=True)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return tmp_path_factory.mktemp("fault_datasets")


@pytest.mark.parametrize("num_processes", [1, 2])
def test_killed_and_resumed_runs_end_like_the_uninterrupted_run(tmp_path, datasets, num_processes):
    reference = tmp_path / "uninterrupted"
    run_driver(datasets, *_command(num_processes, reference, resume=False)[2:])
    out = tmp_path / "killed"

    # 1. Killed inside iteration 3: the last checkpoint is model_0000001 (after iteration 1).
    _run_until_fault(datasets, _command(num_processes, out, False), "stall-iteration:3")
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"

    # 2. Resumed, and killed inside the save of model_0000003: the previous checkpoint and its tag
    #    are intact, the half-saved one is not visible under its name.
    output, _, _ = _run_until_fault(datasets, _command(num_processes, out, True),
                                    "stall-save:model_0000003")
    assert "Starting training from iteration 2" in output
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (out / "model_0000003.pth").exists()
    assert any(name.startswith("model_0000003.pth.tmp.") for name in os.listdir(out))
    torch.load(out / "model_0000001.pth", weights_only=False)  # loadable

    # 3. Resumed again, and killed inside the final evaluation.
    output, _, _ = _run_until_fault(datasets, _command(num_processes, out, True),
                                    "stall-evaluation")
    assert "Starting training from iteration 2" in output
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert not (out / "eval_results.json").exists()

    # 4. Resumed a third time: only the evaluation is left to do.
    output = run_driver(datasets, *_command(num_processes, out, True)[2:]).stdout
    assert not any(name.startswith("model_0000003.pth.tmp.") for name in os.listdir(out))
    _assert_same_run(_final_state(out), _final_state(reference))


def test_the_comparison_sees_detectron2s_resume(tmp_path, datasets):
    """The comparison above can fail: with Detectron2's train loader and checkpoint contents, a
    run resumed from the same checkpoint ends with other weights."""
    env = dict(_env(datasets), DK_TEST_FAULT="detectron2-resume")
    reference, out = tmp_path / "uninterrupted", tmp_path / "resumed"
    subprocess.run(_command(1, reference, resume=False), env=env, cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    out.mkdir()
    for name in ("model_0000001.pth", "last_checkpoint"):
        (out / name).write_bytes((reference / name).read_bytes())
    (out / "last_checkpoint").write_text("model_0000001.pth")
    subprocess.run(_command(1, out, resume=True), env=env, cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    model, _, _ = _final_state(out)
    expected, _, _ = _final_state(reference)
    assert any(not torch.equal(model[k], expected[k]) for k in model)


@pytest.mark.parametrize("fault, error", [
    ("raise:1:2", "injected failure of rank 1 in iteration 2"),
    ("kill:1:2", "process 1 terminated with signal SIGKILL"),
    ("stall-iteration:2", "Timed out waiting"),
])
def test_a_failing_worker_ends_the_whole_job_within_seconds(tmp_path, datasets, fault, error):
    command = _command(2, tmp_path / "out", resume=False)
    command[2:2] = ["--dist-timeout", "10"]  # a worker that stops answering: 10 s, not 30 min
    output, returncode, seconds = _run_until_fault(datasets, command, fault, kill=False)
    assert returncode != 0
    assert error in output
    # Measured on 2 busy shared cores: 10-17 s after a raise or a kill (process teardown), 27 s
    # after a stall (10 s of it the timeout); the bound leaves room for a slower machine.
    print(f"{fault}: exit code {returncode}, {seconds:.1f} s after the fault")
    assert seconds < 60, seconds
