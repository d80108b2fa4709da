"""Multi-process training on the CPU (gloo): 2 processes with 1 image each give the same
parameters after one SGD step as 1 process with both images.

The comparison is exact up to float summation order once every difference between the runs that
is not the distribution is removed: a BN-free model (FrozenBN), no flip augmentation, the same
seed (rank 0 seeds the sampler's shuffle in both runs, so process r of the 2-process run reads
image r of the 1-process batch), and RPN/ROI sampling batches larger than the candidates (so
sampling keeps all of them and its randomness only reorders them).

The step runs at the full learning rate (no warm-up factor), and what is compared is the update
of every parameter (after - before; "before" is saved by each run as training starts, and both
runs must start from the same parameters), with a tolerance relative to that tensor's update:
the DK rotation generators, whose updates are 100x smaller (MODEL.DK.GENERATOR_LR_FACTOR), are
held to their own scale.

Two cases:
- the full DK Mask R-CNN on one image read by every process (so per-process loss normalisers
  match trivially). Both processes compute the same gradient here, so this case checks the Mask
  R-CNN path under DDP, not the gradient all-reduce;
- the DK Faster R-CNN (no mask head, whose loss is a mean over each process's positives) on two
  different images with one object each and a fixed number of proposals per image, so each process
  contributes a different gradient and only their all-reduced average matches the 1-process step.
  Without the all-reduce (``DK_TEST_FAULT=no-allreduce``) the comparison fails.

And the launcher's teardown: a finished worker leaves no process-group thread running for the
interpreter's finalization to meet (where one that needs the GIL aborts the process).
"""
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)

from _train_net_runs import driver_env  # noqa: E402
from train_net_driver import CONFIG, TINY_OPTS  # noqa: E402

SEED = 7
COMPARABLE_OPTS = TINY_OPTS + [
    "MODEL.RESNETS.NORM", "FrozenBN",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "100000", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "100000",
    "INPUT.RANDOM_FLIP", "none", "SEED", str(SEED), "DATASETS.TEST", "()",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "1", "SOLVER.BASE_LR", "0.05",
    "SOLVER.WARMUP_FACTOR", "1.0",  # the step at lr 0.05, not at the warm-up's 0.01 x 0.05
    "MODEL.DEVICE", "cpu",
]
CASES = {
    "same_image_mask_rcnn": ["DATASETS.TRAIN", "('dk_shapes_one',)"],
    "two_images_faster_rcnn": ["DATASETS.TRAIN", "('dk_shapes_two',)", "MODEL.MASK_ON", "False",
                               "MODEL.RPN.POST_NMS_TOPK_TRAIN", "20"],
}


def _train_one_step(tmp_path, num_processes, case_opts, fault=None):
    """Returns (the parameters the run started from, those it ended with)."""
    out = tmp_path / f"procs{num_processes}{'_' + fault if fault else ''}"
    env = dict(driver_env(tmp_path / "datasets"), DK_TEST_SAVE_INITIAL="1")
    if fault:
        env["DK_TEST_FAULT"] = fault
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "train_net_driver.py"), "--config-file",
         CONFIG, "--num-processes", str(num_processes), "--dist-url", "auto", *COMPARABLE_OPTS,
         *case_opts, "OUTPUT_DIR", str(out)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=540,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"World size: {num_processes}" in proc.stdout + proc.stderr
    initial = torch.load(out / "initial_parameters.pth", weights_only=False)
    final = torch.load(out / "model_final.pth", weights_only=False)["model"]
    return initial, {k: final[k] for k in initial}


def _assert_same_start(initial, other_initial):
    """Both runs start from the same parameters (rank 0 seeds SEED + 0 in both runs, and DDP
    broadcasts rank 0's)."""
    assert initial.keys() == other_initial.keys()
    assert all(torch.equal(initial[k], other_initial[k]) for k in initial)


def _update_mismatches(initial, single, double, rtol=1e-3):
    """Parameters whose update in the 2-process run differs from the 1-process run's by more
    than ``rtol`` of the largest element of the 1-process update, plus the rounding of the stored
    weight (two float32 ulps of each element: an update far smaller than its weight is known only
    to the weight's precision). Float summation order aside, the two are the same step."""
    mismatches = []
    for name, before in initial.items():
        expected, got = single[name] - before, double[name] - before
        rounding = 2 * torch.finfo(before.dtype).eps * before.abs() if before.is_floating_point() \
            else torch.zeros_like(expected)
        allowed = rtol * expected.abs().max() + rounding + 1e-12
        if ((got - expected).abs() > allowed).any():
            mismatches.append(name)
    return mismatches


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_gloo_processes_match_one_process(tmp_path, case):
    initial, single = _train_one_step(tmp_path, 1, CASES[case])
    initial_double, double = _train_one_step(tmp_path, 2, CASES[case])
    _assert_same_start(initial, initial_double)
    # The step changed (almost) every weight, the DK generators included, in both runs.
    changed = [n for n in initial if not torch.equal(single[n], initial[n])]
    weights = [n for n in initial if n.endswith(".weight") and "norm" not in n]
    assert len(changed) >= 0.9 * len(weights), (len(changed), len(weights))
    rotations = [n for n in initial if "rotation" in n]
    assert rotations and all(n in changed for n in rotations)
    assert not _update_mismatches(initial, single, double)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_comparison_sees_a_missing_all_reduce(tmp_path):
    """Each process stepping with its own gradient: the update comparison fails, for every DK
    rotation generator tensor too."""
    case = CASES["two_images_faster_rcnn"]
    initial, single = _train_one_step(tmp_path, 1, case)
    initial_unsynchronised, unsynchronised = _train_one_step(tmp_path, 2, case,
                                                             fault="no-allreduce")
    _assert_same_start(initial, initial_unsynchronised)
    mismatches = _update_mismatches(initial, single, unsynchronised)
    rotations = [n for n in initial if "rotation" in n]
    print(f"{len(mismatches)} of {len(initial)} parameters, "
          f"{sum(n in mismatches for n in rotations)} of {len(rotations)} rotation generator "
          "tensors")
    assert len(mismatches) >= 0.5 * len(initial), (len(mismatches), len(initial))
    # Without the all-reduce every rotation generator tensor's update differs by hundreds of
    # times the tolerance: each one is a mismatch, with a wide margin.
    assert rotations and all(n in mismatches for n in rotations), mismatches


def _communicating_work():
    """What a training run does with the process groups: a DDP step (the world group's gloo
    threads), ``comm.all_gather`` (Detectron2's cached global gloo group) and the local rank
    (Detectron2's local group)."""
    from detectron2.utils import comm
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(torch.nn.Linear(4, 2))
    model(torch.randn(3, 4)).sum().backward()
    gathered = comm.all_gather(comm.get_local_rank())
    assert gathered == [0, 1], gathered


def _backend_threads():
    """Names of this process's threads that belong to a process group or its store."""
    names = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/comm") as handle:
            names.append(handle.read().strip())
    return sorted(n for n in names if "gloo" in n or "tcpstore" in n)


def _worker_then_report(local_rank, dist_url, output_dir):
    """Runs one worker of ``launch`` to its end, then writes the backend threads still running
    (those that interpreter finalization would meet) to ``output_dir/rank{local_rank}.txt``."""
    from dk_detectron2.engine.launch import DEFAULT_TIMEOUT, _distributed_worker

    during = []

    def work():
        _communicating_work()
        during.extend(_backend_threads())

    _distributed_worker(local_rank, work, 2, 2, 0, dist_url, (), DEFAULT_TIMEOUT, "gloo")
    with open(os.path.join(output_dir, f"rank{local_rank}.txt"), "w") as handle:
        handle.write(" ".join(during) + "\n" + " ".join(_backend_threads()) + "\n")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names come from /proc")
@pytest.mark.timeout(300)
def test_a_finished_worker_leaves_no_process_group_threads_to_interpreter_finalization(tmp_path):
    """The gloo threads of every process group (world, local, Detectron2's cached gather group)
    and the store's are gone when a worker returns, so finalization cannot abort in them
    (SIGABRT after the work finished, when such a thread needs the GIL)."""
    import torch.multiprocessing as mp
    from detectron2.engine.launch import _find_free_port

    mp.start_processes(_worker_then_report, nprocs=2,
                       args=(f"tcp://127.0.0.1:{_find_free_port()}", str(tmp_path)))
    for rank in (0, 1):
        during, after = (tmp_path / f"rank{rank}.txt").read_text().split("\n")[:2]
        assert "pt_gloo_runloop" in during.split(), during  # the check sees the threads it needs to
        assert after == "", f"rank {rank}: threads still running after the worker: {after}"
