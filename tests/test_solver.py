"""The optimizer: DK generators at MODEL.DK.GENERATOR_LR_FACTOR x the learning rate."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.solver import build_lr_scheduler
from torch import nn

from dk_detectron2 import add_dk_config
from dk_detectron2.engine import DKTrainer
from dk_detectron2.layers import (
    CondConv2d,
    DeformKernel2d,
    DeformKernelConv2d,
    GlobalDeformKernel2d,
    LearntOffsetDeformConv2d,
)
from dk_detectron2.solver import build_dk_optimizer, generator_parameter_names, get_dk_optimizer_params


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.dk = DeformKernel2d(8, 8, 3, padding=1, groups=8, scope_size=4)
        self.dkc = DeformKernelConv2d(8, 8, 3, padding=1, groups=8, scope_size=4)
        self.gdk = GlobalDeformKernel2d(8, 8, 3, padding=1, groups=8, scope_size=4)
        self.dcn = LearntOffsetDeformConv2d(8, 8, 3, padding=1, groups=8)
        self.scc = CondConv2d(8, 8, 3, padding=1, groups=8)


GENERATOR_NAMES = {
    "dk.rotation_conv.weight", "dk.rotation_conv.bias",
    "dkc.offset_conv.weight", "dkc.offset_conv.bias",
    "dkc.rotation_conv.weight", "dkc.rotation_conv.bias",
    "gdk.rotation_fc.weight", "gdk.rotation_fc.bias",
    "dcn.offset_conv.weight", "dcn.offset_conv.bias",
}


def _cfg(factor=0.1, **solver):
    cfg = add_dk_config(get_cfg())
    cfg.MODEL.DK.GENERATOR_LR_FACTOR = factor
    cfg.SOLVER.BASE_LR = 0.02
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    for key, value in solver.items():
        cfg.SOLVER[key] = value
    return cfg


def _lr_of(optimizer, model):
    lr = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lr[p] = group["lr"]
    return {name: lr[p] for name, p in model.named_parameters()}


def test_generator_parameters_are_exactly_the_rotation_and_offset_predictors():
    model = Net()
    assert generator_parameter_names(model) == GENERATOR_NAMES
    assert set(model.dkc.generator_parameters()) == {
        model.dkc.offset_conv.weight, model.dkc.offset_conv.bias,
        model.dkc.rotation_conv.weight, model.dkc.rotation_conv.bias,
    }
    assert list(model.scc.generator_parameters()) == []  # routing is not a sampling location


def test_generators_get_the_factor_and_everything_else_detectron2s_settings():
    model = Net()
    optimizer = DKTrainer.build_optimizer(_cfg(0.1), model)
    lrs = _lr_of(optimizer, model)
    for name, lr in lrs.items():
        assert lr == pytest.approx(0.002 if name in GENERATOR_NAMES else 0.02), name
    decay = {p: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay[model.norm.weight] == 0.0  # WEIGHT_DECAY_NORM still applies
    assert decay[model.stem.weight] == pytest.approx(1e-4)


def test_factor_one_is_detectron2s_optimizer_and_negative_is_rejected():
    model = Net()
    assert set(_lr_of(DKTrainer.build_optimizer(_cfg(1.0), model), model).values()) == {0.02}
    with pytest.raises(ValueError, match="MODEL.DK.GENERATOR_LR_FACTOR"):
        build_dk_optimizer(_cfg(-1.0), model)
    with pytest.raises(ValueError, match="base_lr"):
        get_dk_optimizer_params(model, generator_lr_factor=0.5)


def test_schedule_keeps_the_ratio_and_gradient_clipping_wraps_the_optimizer():
    cfg = _cfg(0.1, WARMUP_ITERS=10, MAX_ITER=20, STEPS=(15,))
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    model = Net()
    optimizer = build_dk_optimizer(cfg, model)
    assert type(optimizer).__name__ != "SGD" and isinstance(optimizer, torch.optim.SGD)
    scheduler = build_lr_scheduler(cfg, optimizer)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for _ in range(16):
        optimizer.step()
        scheduler.step()
    lrs = _lr_of(optimizer, model)
    assert lrs["dk.rotation_conv.weight"] == pytest.approx(0.1 * lrs["dk.weight"])
    assert lrs["dk.weight"] == pytest.approx(0.02 * 0.1)  # after the step at 15
