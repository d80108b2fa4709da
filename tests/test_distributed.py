"""Multi-process training on the CPU (gloo): 2 processes with 1 image each give the same
parameters after one SGD step as 1 process with both images.

The comparison is exact up to float summation order once every difference between the runs that
is not the distribution is removed: a BN-free model (FrozenBN), no flip augmentation, the same
seed (rank 0 seeds the sampler's shuffle in both runs, so process r of the 2-process run reads
image r of the 1-process batch), and RPN/ROI sampling batches larger than the candidates (so
sampling keeps all of them and its randomness only reorders them).

Two cases:
- the full DK Mask R-CNN on one image read by every process (so per-process loss normalisers
  match trivially);
- the DK Faster R-CNN (no mask head, whose loss is a mean over each process's positives) on two
  different images with one object each and a fixed number of proposals per image, so each process
  contributes a different gradient and only their all-reduced average matches the 1-process step.
"""
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)

from test_train_net import run_driver  # noqa: E402
from train_net_driver import CONFIG, TINY_OPTS  # noqa: E402

SEED = 7
COMPARABLE_OPTS = TINY_OPTS + [
    "MODEL.RESNETS.NORM", "FrozenBN",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "100000", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "100000",
    "INPUT.RANDOM_FLIP", "none", "SEED", str(SEED), "DATASETS.TEST", "()",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "1", "SOLVER.BASE_LR", "0.05",
    "MODEL.DEVICE", "cpu",
]
CASES = {
    "same_image_mask_rcnn": ["DATASETS.TRAIN", "('dk_shapes_one',)"],
    "two_images_faster_rcnn": ["DATASETS.TRAIN", "('dk_shapes_two',)", "MODEL.MASK_ON", "False",
                               "MODEL.RPN.POST_NMS_TOPK_TRAIN", "20"],
}


def _train_one_step(tmp_path, num_processes, case_opts):
    out = tmp_path / f"procs{num_processes}"
    proc = run_driver(
        tmp_path / "datasets", "--config-file", CONFIG, "--num-processes", str(num_processes),
        "--dist-url", "auto", *COMPARABLE_OPTS, *case_opts, "OUTPUT_DIR", str(out),
    )
    assert f"World size: {num_processes}" in proc.stdout + proc.stderr
    return torch.load(out / "model_final.pth", weights_only=False)["model"]


def _initial_parameters(case_opts):
    """The parameters both runs start from (rank 0 seeds SEED + 0, and DDP broadcasts rank 0's)."""
    from detectron2.modeling import build_model
    from detectron2.utils.env import seed_all_rng

    import train_net

    cfg = train_net.build_config(train_net.argument_parser().parse_args(
        ["--config-file", CONFIG, *COMPARABLE_OPTS, *case_opts]
    ))
    seed_all_rng(SEED)
    return {k: v.detach().clone() for k, v in build_model(cfg).state_dict().items()}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_gloo_processes_match_one_process(tmp_path, case):
    single = _train_one_step(tmp_path, 1, CASES[case])
    double = _train_one_step(tmp_path, 2, CASES[case])
    assert single.keys() == double.keys()
    for name in single:
        torch.testing.assert_close(double[name], single[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
    # Both started from the same weights, and the step changed them.
    initial = _initial_parameters(CASES[case])
    changed = [n for n, v in single.items() if n in initial and not torch.equal(v, initial[n])]
    weights = [n for n in initial if n.endswith(".weight") and "norm" not in n]
    assert len(changed) >= 0.9 * len(weights), (len(changed), len(weights))
    assert any("rotation" in n for n in changed)  # the DK generators learnt in both runs
