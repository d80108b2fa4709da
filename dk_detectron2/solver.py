"""Optimizer parameters with a learning-rate factor for the DK generators.

The generators (the convolutions that predict kernel rotations and image offsets, see
``KernelConvBase.generator_names``) start at zero and their outputs are coordinates, not features:
at the full learning rate they can swing samples far outside the scope, where the bilinear rule
reads zero and no gradient comes back. As is usual for deformable convolution's offsets, they train
at a fraction (``MODEL.DK.GENERATOR_LR_FACTOR``) of the learning rate of the rest of the model.

- yacs configs: ``build_dk_optimizer(cfg, model)`` (what ``DKTrainer`` uses);
- LazyConfigs: ``optimizer.params = L(get_dk_optimizer_params)(base_lr="${..lr}", ...)``.
"""
from typing import Callable, Dict, List, Set

import torch
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from .layers.deform_kernel import KernelConvBase

__all__ = [
    "GENERATOR_GROUP_KEY",
    "build_dk_optimizer",
    "get_dk_optimizer_params",
    "generator_parameter_names",
    "generator_lr_factor_func",
]


# Key set to True in the optimizer parameter groups that hold only DK generator parameters (what
# the GeneratorWarmup hook acts on).
GENERATOR_GROUP_KEY = "dk_generator"


def generator_parameter_names(model: torch.nn.Module) -> Set[str]:
    """Full names (as ``model.named_parameters()``) of every DK generator parameter in ``model``."""
    generators = {
        id(p)
        for module in model.modules()
        if isinstance(module, KernelConvBase)
        for p in module.generator_parameters()
    }
    return {name for name, p in model.named_parameters() if id(p) in generators}


def generator_lr_factor_func(model: torch.nn.Module, factor: float) -> Callable[[str], float]:
    """A ``lr_factor_func`` for ``get_default_optimizer_params``: ``factor`` for the generator
    parameters of ``model``, 1 for all others."""
    names = generator_parameter_names(model)
    return lambda name: factor if name in names else 1.0


def get_dk_optimizer_params(
    model: torch.nn.Module, generator_lr_factor: float = 0.01, **kwargs
) -> List[Dict]:
    """``detectron2.solver.get_default_optimizer_params(model, **kwargs)`` with the generators'
    learning rate multiplied by ``generator_lr_factor`` (which needs ``base_lr`` in ``kwargs``
    unless the factor is 1). The generator parameters are in groups of their own, marked with
    ``GENERATOR_GROUP_KEY: True``."""
    if generator_lr_factor < 0:
        raise ValueError(f"generator_lr_factor must be >= 0, got {generator_lr_factor}")
    if generator_lr_factor != 1.0:
        if kwargs.get("base_lr") is None:
            raise ValueError("get_dk_optimizer_params needs base_lr when generator_lr_factor != 1")
        kwargs["lr_factor_func"] = generator_lr_factor_func(model, generator_lr_factor)
    groups = get_default_optimizer_params(model, **kwargs)
    generators = {id(p) for m in model.modules() if isinstance(m, KernelConvBase)
                  for p in m.generator_parameters()}
    split = []
    for group in groups:
        rest = [p for p in group["params"] if id(p) not in generators]
        own = [p for p in group["params"] if id(p) in generators]
        if rest:
            split.append({**group, "params": rest})
        if own:
            split.append({**group, "params": own, GENERATOR_GROUP_KEY: True})
    return split


def build_dk_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``detectron2.solver.build_optimizer`` (SGD, norm/bias overrides, gradient clipping) with the
    generators at ``cfg.MODEL.DK.GENERATOR_LR_FACTOR`` times ``SOLVER.BASE_LR``."""
    factor = float(cfg.MODEL.DK.GENERATOR_LR_FACTOR)
    if factor < 0:
        raise ValueError(f"MODEL.DK.GENERATOR_LR_FACTOR must be >= 0, got {factor}")
    params = get_dk_optimizer_params(
        model,
        generator_lr_factor=factor,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    optimizer = torch.optim.SGD(
        params,
        lr=cfg.SOLVER.BASE_LR,
        momentum=cfg.SOLVER.MOMENTUM,
        nesterov=cfg.SOLVER.NESTEROV,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        foreach=True,
    )
    return maybe_add_gradient_clipping(cfg, optimizer)
