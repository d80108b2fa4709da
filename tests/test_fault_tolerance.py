"""Training that survives faults, end to end with ``train_net.py`` on the CPU (1 thread per
process):

- a run SIGKILLed inside an iteration, inside a checkpoint save, while appending to
  ``metrics.json`` just after a later checkpoint, and inside the final evaluation, and resumed
  with ``--resume`` after each kill, ends with the uninterrupted run's weights (bit for bit),
  metrics (every iteration's record) and evaluation results; with 1 process and with 2 gloo
  processes; with 2 DataLoader workers; with ``SEED -1`` (a seed drawn at the start);
- with an evaluation after each checkpoint, a run killed after a checkpoint (before or after
  that evaluation) and resumed keeps the evaluation's results in ``metrics.json``, in one record;
- a kill inside a save leaves the previous checkpoint and ``last_checkpoint`` intact;
- a 2-process job whose worker raises or is killed exits non-zero within seconds with the default
  30-minute collective timeout, and one whose worker stops answering within ``--dist-timeout``;
  the failing worker's error is in the output and in its log file.

Faults are injected by ``tests/train_net_driver.py`` (``$DK_TEST_FAULT``), which also writes
``metrics.json`` after every iteration. The tests print what they survived (``pytest -rP``).
"""
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
sys.path.insert(0, TESTS)

from _train_net_runs import driver_env, run_driver  # noqa: E402
from train_net_driver import CONFIG, TINY_OPTS  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# 6 iterations, a checkpoint after every second one, the final evaluation on 4 images.
SOLVER_MAX_ITER = 6
SCHEDULE = TINY_OPTS + [
    "DATASETS.TRAIN", "('dk_shapes_tiny_train',)", "DATASETS.TEST", "('dk_shapes_tiny_val',)",
    "SOLVER.MAX_ITER", str(SOLVER_MAX_ITER), "SOLVER.CHECKPOINT_PERIOD", "2", "SEED", "5",
]
# Logged values that measure the machine, not the training.
TIMING_KEYS = {"time", "data_time", "rank_data_time", "eta_seconds"}


def _command(num_processes, out, resume, opts=()):
    return [sys.executable, os.path.join(TESTS, "train_net_driver.py"), "--config-file", CONFIG,
            "--num-processes", str(num_processes), "--dist-url", "auto",
            *(["--resume"] if resume else []), *SCHEDULE, *opts, "OUTPUT_DIR", str(out)]


def _run(datasets, command):
    """Runs ``command`` to its end; returns its output (stdout and stderr)."""
    proc = run_driver(datasets, *command[2:])
    return proc.stdout + proc.stderr


def _run_until_fault(datasets, command, fault, kill=True, timeout=300, exit_within=None):
    """Starts ``command`` with ``fault`` injected; when the driver reports it, SIGKILLs the whole
    process group if ``kill``, else waits ``exit_within`` seconds at most for the job to exit by
    itself. Returns (output, return code or None if it did not exit, seconds from the fault to
    the exit); the process group is killed in any case."""
    proc = subprocess.Popen(
        command, env=dict(driver_env(datasets), DK_TEST_FAULT=fault), cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    lines = queue.Queue()  # read by a thread, so that a job that hangs silently cannot block us
    threading.Thread(target=lambda: [*map(lines.put, proc.stdout), lines.put(None)],
                     daemon=True).start()
    output, fault_time, deadline, returncode = [], None, time.monotonic() + timeout, None
    try:
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            if line is None:
                break
            output.append(line)
            if fault_time is None and line.startswith("DK_TEST_FAULT"):
                fault_time = time.monotonic()
                if kill:
                    os.killpg(proc.pid, signal.SIGKILL)
                elif exit_within is not None:
                    deadline = fault_time + exit_within
        try:
            returncode = proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = "".join(output)
    assert fault_time is not None, f"the fault {fault!r} never happened:\n{output[-3000:]}"
    return output, returncode, time.monotonic() - fault_time


def _last_checkpoint(out):
    return (out / "last_checkpoint").read_text()


def _final_state(out):
    """Weights, metrics (``metrics.json``'s records in file order, timing left out) and
    evaluation results."""
    model = torch.load(out / "model_final.pth", weights_only=False)["model"]
    with open(out / "metrics.json") as f:
        records = [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
                   for line in f]
    with open(out / "eval_results.json") as f:
        results = json.load(f)
    return model, records, results


def _assert_same_run(resumed, uninterrupted, from_iteration=0, every_iteration=True):
    """Same weights, evaluation results and ``metrics.json``: the same records in the same order,
    none written twice or lost (those of iterations >= ``from_iteration``: a run resumed in
    another folder has only those). ``every_iteration``: the writers wrote after every iteration
    (the driver's default), so every iteration up to ``SOLVER.MAX_ITER`` has its record."""
    model, records, results = resumed
    expected_model, expected_records, expected_results = uninterrupted
    assert model.keys() == expected_model.keys()
    different = [k for k in model if not torch.equal(model[k], expected_model[k])]
    assert not different, f"{len(different)} tensors differ, first: {different[:3]}"
    # Losses are logged as medians over the last 20 iterations: equal only if the history was
    # restored too. NaN (an AP of an absent size) is not equal to itself: compare as JSON text.
    expected_records = [r for r in expected_records if r["iteration"] >= from_iteration]
    iterations = [r["iteration"] for r in records]
    assert iterations == [r["iteration"] for r in expected_records], "records (by iteration)"
    if every_iteration:
        assert iterations == list(range(from_iteration, SOLVER_MAX_ITER + 1))
    for record, expected in zip(records, expected_records):
        different = {k: (record.get(k), expected.get(k)) for k in set(record) | set(expected)
                     if json.dumps(record.get(k)) != json.dumps(expected.get(k))}
        assert not different, f"iteration {record['iteration']}: (resumed, uninterrupted) {different}"
    assert json.dumps(results, sort_keys=True) == json.dumps(expected_results, sort_keys=True)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return tmp_path_factory.mktemp("fault_datasets")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, datasets):
    """``uninterrupted(num_processes, opts=())``: the final state of the run that was never
    stopped."""
    runs = {}

    def final_state(num_processes, opts=()):
        key = (num_processes, tuple(opts))
        if key not in runs:
            out = tmp_path_factory.mktemp(f"uninterrupted_{num_processes}")
            _run(datasets, _command(num_processes, out, resume=False, opts=opts))
            runs[key] = _final_state(out)
        return runs[key]

    return final_state


@pytest.mark.parametrize("num_processes", [1, 2])
def test_killed_and_resumed_runs_end_like_the_uninterrupted_run(tmp_path, datasets, uninterrupted,
                                                                 num_processes):
    out = tmp_path / "killed"

    def command(resume):
        return _command(num_processes, out, resume)

    # 1. Killed inside iteration 3: the last checkpoint is model_0000001 (after iteration 1).
    _run_until_fault(datasets, command(False), "stall-iteration:3")
    assert _last_checkpoint(out) == "model_0000001.pth"

    # 2. Resumed, and killed inside the save of model_0000003: the previous checkpoint and its tag
    #    are intact, the half-saved one is not visible under its name.
    output, _, _ = _run_until_fault(datasets, command(True), "stall-save:model_0000003")
    assert "Starting training from iteration 2" in output
    assert _last_checkpoint(out) == "model_0000001.pth"
    assert not (out / "model_0000003.pth").exists()
    assert any(name.startswith("model_0000003.pth.tmp.") for name in os.listdir(out))
    torch.load(out / "model_0000001.pth", weights_only=False)  # loadable

    # 3. Resumed again, and killed while appending iteration 3's record to metrics.json, after
    #    model_0000003 was saved: the file ends with half a record.
    output, _, _ = _run_until_fault(datasets, command(True), "stall-metrics:3")
    assert "Starting training from iteration 2" in output
    assert _last_checkpoint(out) == "model_0000003.pth"
    torn = (out / "metrics.json").read_text().rsplit("\n", 1)[-1]
    assert torn.startswith("{") and not torn.endswith("}"), torn

    # 4. Resumed from the later checkpoint (the torn record removed, iteration 3's written again),
    #    and killed inside the final evaluation.
    output, _, _ = _run_until_fault(datasets, command(True), "stall-evaluation")
    assert "Starting training from iteration 4" in output
    assert "metrics.json ended with a half-written record" in output
    assert _last_checkpoint(out) == "model_final.pth"
    assert not (out / "eval_results.json").exists()

    # 5. Resumed a fourth time: only the evaluation is left to do.
    output = _run(datasets, command(True))
    assert "Starting training from iteration 6" in output
    assert not any(".tmp." in name for name in os.listdir(out))
    _assert_same_run(_final_state(out), uninterrupted(num_processes))
    print(f"{num_processes} process(es): killed in iteration 3, in the save of model_0000003, in "
          "the metrics.json record of iteration 3, in the final evaluation; 4 resumes; final "
          "weights bitwise equal, metrics of iterations 0-6 and evaluation results equal")


def test_a_run_with_dataloader_workers_resumes_from_a_later_checkpoint(tmp_path, datasets,
                                                                        uninterrupted):
    """DATALOADER.NUM_WORKERS 2, killed inside iteration 5 and resumed from model_0000003: ends
    like the uninterrupted run without workers (the data stream does not depend on them)."""
    out, workers = tmp_path / "workers", ["DATALOADER.NUM_WORKERS", "2"]
    _run_until_fault(datasets, _command(1, out, False, workers), "stall-iteration:5")
    assert _last_checkpoint(out) == "model_0000003.pth"
    output = _run(datasets, _command(1, out, True, workers))
    assert "Starting training from iteration 4" in output
    _assert_same_run(_final_state(out), uninterrupted(1))
    print("2 DataLoader workers: killed in iteration 5, 1 resume from model_0000003; final weights "
          "bitwise equal to the run without workers, metrics and evaluation results equal")


def _records(out, iteration):
    """The records of ``iteration`` in ``out/metrics.json``."""
    with open(out / "metrics.json") as f:
        return [record for record in map(json.loads, f) if record["iteration"] == iteration]


@pytest.mark.parametrize("num_processes", [1, 2])
def test_evaluations_at_checkpoint_iterations_survive_a_resume(tmp_path, datasets, uninterrupted,
                                                               num_processes):
    """TEST.EVAL_PERIOD 2: iterations 1 and 3 end with a checkpoint, an evaluation and then their
    metrics.json record, which holds the evaluation's results (bbox/AP...). The checkpoint's
    history lacks them (saved before the evaluation), yet a resumed run keeps them:

    - killed inside iteration 5 (iteration 3's record written): the record stays the file's only
      record of iteration 3, not followed by one without the evaluation;
    - killed inside iteration 3's evaluation (record lost): the resumed run evaluates at
      iteration 3 before it goes on, and writes the record with the results."""
    opts = ["TEST.EVAL_PERIOD", "2"]
    expected = uninterrupted(num_processes, opts)
    by_iteration = {record["iteration"]: record for record in expected[1]}
    assert "bbox/AP" in by_iteration[3] and "bbox/AP" in by_iteration[1]

    out = tmp_path / "killed_after_the_record"
    _run_until_fault(datasets, _command(num_processes, out, False, opts), "stall-iteration:5")
    assert _last_checkpoint(out) == "model_0000003.pth"
    assert ["bbox/AP" in record for record in _records(out, 3)] == [True]
    output = _run(datasets, _command(num_processes, out, True, opts))
    assert "Starting training from iteration 4" in output
    assert len(_records(out, 3)) == 1
    _assert_same_run(_final_state(out), expected)

    out = tmp_path / "killed_in_the_evaluation"
    _run_until_fault(datasets, _command(num_processes, out, False, opts), "stall-evaluation:3")
    assert _last_checkpoint(out) == "model_0000003.pth"
    assert not _records(out, 3)
    output = _run(datasets, _command(num_processes, out, True, opts))
    assert "Starting training from iteration 4" in output
    assert "metrics.json ends at iteration 2: finishing iteration 3" in output
    assert len(_records(out, 3)) == 1
    _assert_same_run(_final_state(out), expected)
    print(f"{num_processes} process(es), TEST.EVAL_PERIOD 2: killed in iteration 5 and in "
          "iteration 3's evaluation, each resumed from model_0000003; iteration 3's record (with "
          "its bbox/AP) once in metrics.json, final weights bitwise equal, metrics and evaluation "
          "results equal")


def _iterations(out):
    with open(out / "metrics.json") as f:
        return [json.loads(line)["iteration"] for line in f]


def test_resume_with_the_shipped_writer_period_and_periods_it_does_not_divide(
        tmp_path, datasets, uninterrupted, monkeypatch):
    """Detectron2's writer period (20: records at 19, 39, ...; an evaluation's record comes with
    the next write, after that write's own record), checkpoints every 7 iterations, evaluations
    every 13, over 125 iterations (more than the 100 values per scalar that a checkpoint keeps):

    - killed inside the evaluation at iteration 90 (model_0000090 saved; metrics.json ends at
      79): the resumed run evaluates at 90 again, says so, and the results reach the write at 99;
    - killed inside iteration 121 (model_0000118, whose history was cut to 100 values; the write
      at 119 holds 119's record and the evaluation at 116's): the resumed run finishes nothing
      and writes neither record again.

    Ends like the uninterrupted run: final weights bit for bit, metrics.json record for record."""
    monkeypatch.setenv("DK_TEST_SHIPPED_WRITER_PERIOD", "1")
    opts = ["SOLVER.MAX_ITER", "125", "SOLVER.CHECKPOINT_PERIOD", "7", "TEST.EVAL_PERIOD", "13"]
    expected = uninterrupted(1, opts)
    written = [record["iteration"] for record in expected[1]]
    assert written.index(116) == written.index(119) + 1  # the evaluation's after the write's own
    out = tmp_path / "killed"

    _run_until_fault(datasets, _command(1, out, False, opts), "stall-evaluation:90")
    assert _last_checkpoint(out) == "model_0000090.pth" and max(_iterations(out)) == 79

    output, _, _ = _run_until_fault(datasets, _command(1, out, True, opts), "stall-iteration:121")
    assert "Starting training from iteration 91" in output
    assert ("metrics.json ends at iteration 79: finishing iteration 90 of the checkpoint (its "
            "evaluation)") in output
    assert _last_checkpoint(out) == "model_0000118.pth" and _iterations(out)[-2:] == [119, 116]

    output = _run(datasets, _command(1, out, True, opts))
    assert "Starting training from iteration 119" in output
    assert "finishing iteration" not in output
    _assert_same_run(_final_state(out), expected, every_iteration=False)
    print("writer period 20, checkpoints every 7, evaluations every 13, 125 iterations: killed in "
          "the evaluation at 90 and in iteration 121, resumed from model_0000090 and "
          "model_0000118; final weights bitwise equal, metrics.json record for record")


def _resume_in_another_folder(datasets, reference, out, checkpoint, opts=(), env=None):
    """Copies ``checkpoint`` of ``reference`` into the empty folder ``out`` and resumes from it."""
    out.mkdir()
    shutil.copy(reference / checkpoint, out / checkpoint)
    (out / "last_checkpoint").write_text(checkpoint)
    subprocess.run(_command(1, out, resume=True, opts=opts), env=env or driver_env(datasets),
                   cwd=REPO, check=True, capture_output=True, timeout=300)


def test_a_run_with_a_random_seed_resumes_exactly(tmp_path, datasets):
    """SEED -1 (Detectron2's default): the seed drawn at the start is saved in the checkpoints,
    and a run resumed from model_0000003 (in another folder) ends with the same weights."""
    reference, out, opts = tmp_path / "uninterrupted", tmp_path / "resumed", ["SEED", "-1"]
    _run(datasets, _command(1, reference, resume=False, opts=opts))
    _resume_in_another_folder(datasets, reference, out, "model_0000003.pth", opts)
    _assert_same_run(_final_state(out), _final_state(reference), from_iteration=3)
    print("SEED -1: resumed from model_0000003 in another folder; final weights bitwise equal, "
          "metrics of iterations 3-6 and evaluation results equal")


def test_the_comparison_sees_detectron2s_resume(tmp_path, datasets):
    """The comparison above can fail: with Detectron2's train loader and checkpoint contents, a
    run resumed from the same checkpoint ends with other weights."""
    env = dict(driver_env(datasets), DK_TEST_FAULT="detectron2-resume")
    reference, out = tmp_path / "uninterrupted", tmp_path / "resumed"
    subprocess.run(_command(1, reference, resume=False), env=env, cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    _resume_in_another_folder(datasets, reference, out, "model_0000001.pth", env=env)
    model, _, _ = _final_state(out)
    expected, _, _ = _final_state(reference)
    assert any(not torch.equal(model[k], expected[k]) for k in model)


# Rank 0 is busy outside any collective when rank 1 fails (see the driver): with the default
# 30-minute timeout, only the launcher's teardown ends it. The teardown takes seconds; the 30 s
# bound leaves room for a loaded machine and is still far below any collective timeout.
@pytest.mark.parametrize("fault, error, logged", [
    ("raise:1:2", "injected failure of rank 1 in iteration 2", True),
    ("kill:1:2", "process 1 terminated with signal SIGKILL", False),  # rank 1 cannot log it
])
def test_a_failing_worker_ends_the_whole_job_within_seconds(tmp_path, datasets, fault, error,
                                                            logged):
    out = tmp_path / "out"
    output, returncode, seconds = _run_until_fault(datasets, _command(2, out, resume=False),
                                                   fault, kill=False, exit_within=30)
    print(f"{fault}: exit code {returncode}, {seconds:.1f} s after the fault")
    assert returncode is not None, f"still running {seconds:.0f} s after the fault"
    assert returncode != 0
    assert error in output
    if logged:
        assert error in (out / "log.txt.rank1").read_text()


def test_a_worker_that_stops_answering_ends_the_job_after_the_dist_timeout(tmp_path, datasets):
    out = tmp_path / "out"
    command = _command(2, out, resume=False)
    command[2:2] = ["--dist-timeout", "10"]  # 10 s, not 30 min
    output, returncode, seconds = _run_until_fault(datasets, command, "stall-iteration:2",
                                                   kill=False, exit_within=60)
    print(f"stall-iteration:2 with --dist-timeout 10: exit code {returncode}, {seconds:.1f} s "
          "after the fault")
    assert returncode is not None, f"still running {seconds:.0f} s after the fault"
    assert returncode != 0
    assert "Timed out waiting" in output
    assert "Timed out waiting" in (out / "log.txt.rank1").read_text()
    # Only rank 1's collective timeout ends the job: never before its 10 s have passed.
    assert seconds >= 10, seconds
