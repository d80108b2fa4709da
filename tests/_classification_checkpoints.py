"""Classification models that look trained, and their checkpoints in timm's formats.

- :func:`trained_like`: random BatchNorm statistics and affine parameters and non-zero DK
  generators (so rotations and offsets are not zero and a lost generator would show);
- :func:`save_timm_checkpoint`: the file timm's ``CheckpointSaver`` writes in training
  (``{"state_dict", "state_dict_ema", "arch", "epoch", "optimizer", "args", ...}``);
- :func:`stage_outputs`, :func:`relative_difference` and :func:`assert_stages_match`, to compare a
  timm model with a Detectron2 backbone stage by stage.
"""
import argparse
import os
from typing import Dict

import torch
from timm.utils import CheckpointSaver, ModelEmaV3

from dk_detectron2.classification import generator_parameters

__all__ = [
    "trained_like",
    "save_timm_checkpoint",
    "stage_outputs",
    "relative_difference",
    "assert_stages_match",
]

STAGES = ("res2", "res3", "res4", "res5")


@torch.no_grad()
def trained_like(model: torch.nn.Module, seed: int = 0, generator_std: float = 0.02):
    """``model`` with random BatchNorm statistics / affine parameters and generators of std
    ``generator_std`` (rotations of a fraction of a cell on unit inputs); returns it."""
    rng = torch.Generator().manual_seed(seed)

    def uniform(tensor, low, high):
        tensor.copy_(torch.rand(tensor.shape, generator=rng) * (high - low) + low)

    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            uniform(module.weight, 0.5, 1.5)
            uniform(module.bias, -0.2, 0.2)
            uniform(module.running_mean, -0.2, 0.2)
            uniform(module.running_var, 0.5, 2.0)
    for parameter in generator_parameters(model):
        parameter.copy_(torch.randn(parameter.shape, generator=rng) * generator_std)
    return model


def save_timm_checkpoint(model: torch.nn.Module, directory, arch: str, epoch: int = 3) -> str:
    """Writes ``model`` with timm's ``CheckpointSaver`` (as the classification trainer does: its
    argparse flags in ``"args"``, an EMA, an optimizer); returns the ``model_best.pth.tar`` path."""
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    args = argparse.Namespace(model=arch, lr=0.1, epochs=epoch + 1, model_kwargs={"scope_size": 5})
    saver = CheckpointSaver(
        model, optimizer, args=args, model_ema=ModelEmaV3(model), checkpoint_dir=directory,
        recovery_dir=directory, decreasing=False, max_history=1,
    )
    saver.save_checkpoint(epoch, metric=50.0)
    return os.path.join(directory, "model_best.pth.tar")


@torch.no_grad()
def stage_outputs(model: torch.nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """res2..res5 of a timm ``DKResNet`` on ``x`` [B, 3, H, W] (stem, then each stage)."""
    outputs = {}
    x = model.stem(x)
    for name in STAGES:
        x = getattr(model, name)(x)
        outputs[name] = x
    return outputs


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (float64)."""
    expected = expected.double()
    return float((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def assert_stages_match(ours: Dict[str, torch.Tensor], theirs: Dict[str, torch.Tensor],
                        stages=STAGES, tolerance: float = 1e-5) -> None:
    """Each of ``stages`` of ``ours`` within ``tolerance`` (relative) of ``theirs``."""
    for stage in stages:
        difference = relative_difference(ours[stage], theirs[stage])
        assert difference <= tolerance, (stage, difference)
