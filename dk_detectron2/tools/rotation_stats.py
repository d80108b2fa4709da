"""How far the rotations of a model's DK layers move their taps: per layer, the rotation size,
the share of taps that left the scope and the share held on its edge (``python -m
dk_detectron2.tools.kernel_samples --stats`` prints them). The rotations are recorded with
:func:`.kernel_samples.capture_kernel_sampling` while the model runs."""
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from ..layers.geometry import base_grid
from .kernel_samples import GLOBAL_OP, LOCAL_OPS, capture_kernel_sampling

__all__ = ["find_dk_layers", "rotation_statistics"]


def _reads_zero(points: torch.Tensor, scope_h: int, scope_w: int) -> torch.Tensor:
    """Bilinear rule: a sample point (y, x) with y <= -1, y >= Sh, x <= -1 or x >= Sw reads 0."""
    y, x = points[..., 0], points[..., 1]
    return (y <= -1) | (y >= scope_h) | (x <= -1) | (x >= scope_w)


def _on_scope_edge(points: torch.Tensor, scope_h: int, scope_w: int) -> torch.Tensor:
    """A sample point on (or beyond) the first or last row or column of the scope: where
    ``ROTATION_CLIP "scope"`` holds a tap, with the gradient of its rotation stopped."""
    y, x = points[..., 0], points[..., 1]
    eps = 1e-6
    return (y <= eps) | (y >= scope_h - 1 - eps) | (x <= eps) | (x >= scope_w - 1 - eps)


def rotation_statistics(model: nn.Module, run: Callable[[], object]) -> List[Dict[str, object]]:
    """Measures the rotations every DK layer of ``model`` uses while ``run()`` executes.

    Args:
        model: a module containing DK layers (see :func:`find_dk_layers`).
        run: a callable running ``model`` (or part of it) on some input, e.g.
            ``lambda: model.backbone(images)``.

    Returns:
        One dict per DK layer that ran: ``layer`` (module name), ``op``, ``mean_abs_rotation`` and
        ``max_abs_rotation`` (scope cells), and ``taps_reading_zero``: the fraction of sampled
        taps (over positions, images and rotation groups) whose point lies outside ``(-1, S)``,
        where the bilinear read is zero. A layer with 100% reads zero everywhere: it is dead.
        ``taps_on_scope_edge``: the fraction whose point lies on (or beyond) the scope's border
        row or column, where rotation clipping to the scope holds a tap and stops its gradient.
    """
    names = find_dk_layers(model)
    spans: Dict[str, Tuple[int, int]] = {}
    with torch.no_grad(), capture_kernel_sampling() as calls:
        hooks = []
        for name in names:
            module = model.get_submodule(name)

            def before(module, inputs, name=name):
                spans[name] = (len(calls), -1)

            def after(module, inputs, output, name=name):
                spans[name] = (spans[name][0], len(calls))

            hooks.append(module.register_forward_pre_hook(before))
            hooks.append(module.register_forward_hook(after))
        try:
            run()
        finally:
            for hook in hooks:
                hook.remove()
    results = []
    for name in names:
        if name not in spans:
            continue
        start, end = spans[name]
        layer_calls = calls[start:end]
        module = model.get_submodule(name)
        scope_h, scope_w = module.weight.shape[-2:]
        local = [c for c in layer_calls if c.op in LOCAL_OPS]
        if local:
            call = local[-1]
            taps = call.kernel_size[0] * call.kernel_size[1]
            batch, _, out_h, out_w = call.rotation.shape
            rotation = call.rotation.reshape(batch, -1, taps, 2, out_h, out_w).movedim(3, -1)
            base = base_grid(tuple(call.kernel_size), (scope_h, scope_w), torch.float64)
            points = rotation.double() + base.view(1, 1, taps, 1, 1, 2)
            op = call.op
        else:
            sampled = [c for c in layer_calls if c.op == GLOBAL_OP]
            if not sampled:
                continue
            points = torch.stack([c.coord.double() for c in sampled])
            base = base_grid(tuple(module.kernel_size), (scope_h, scope_w), torch.float64)
            rotation = points.reshape(len(sampled), -1, base.shape[0], 2) - base
            op = GLOBAL_OP
        results.append(
            {
                "layer": name,
                "op": op.split("::")[-1],
                "mean_abs_rotation": float(rotation.abs().mean()),
                "max_abs_rotation": float(rotation.abs().max()),
                "taps_reading_zero": float(_reads_zero(points, scope_h, scope_w).double().mean()),
                "taps_on_scope_edge": float(
                    _on_scope_edge(points, scope_h, scope_w).double().mean()
                ),
            }
        )
    return results


def find_dk_layers(model: nn.Module) -> List[str]:
    """Names of the modules of ``model`` that own a scope and a rotation generator."""
    from dk_detectron2.layers.deform_kernel import (
        DeformKernel2d,
        DeformKernelConv2d,
        GlobalDeformKernel2d,
    )

    kinds = (DeformKernel2d, DeformKernelConv2d, GlobalDeformKernel2d)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]
