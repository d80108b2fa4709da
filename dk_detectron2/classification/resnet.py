"""Depthwise ResNets with Deformable Kernels as timm models (the paper's classification setting).

The network is built from the same pieces as the Detectron2 backbone
(:func:`dk_detectron2.modeling.backbone.resnet_dk.make_resnet_dk_stages` and Detectron2's
``BasicStem``) under the same module names (``stem``, ``res2`` ... ``res5``), plus timm's
classifier head (``head``). So a checkpoint of one is a checkpoint of the other: Detectron2's suffix
matching maps ``res3.0.conv2.weight`` onto ``backbone.bottom_up.res3.0.conv2.weight`` and the stage
outputs agree exactly (stride in the 3x3 conv, a 7x7 stride-2 stem with a 3x3 max pool).

Registered names (``timm.create_model(name, num_classes=N, **kwargs)`` after
``import dk_detectron2``):

======================  ==================================================================
``resnet50_dw``         ResNet-50 whose bottleneck 3x3 convs are depthwise (the paper's rigid
                        baseline, DW-ResNet-50)
``dk_resnet50_dw``      the same with local Deformable Kernels in res3-res5
``dkdcn_resnet50_dw``   the same with DK + deformable convolution in res3-res5
``resnet18_dw``         ResNet-18 whose 3x3 convs are depthwise-separable (depthwise 3x3, then
                        1x1); ``dk_resnet18_dw``, ``dkdcn_resnet18_dw`` as above
``*_050``               the R18 models at half width (stem and res2 of 32 channels): the
                        backbone of the embedded Mask R-CNN job (``configs/shapes``)
======================  ==================================================================

Keyword arguments (the Detectron2 config key each mirrors in brackets): ``on_per_stage``
(MODEL.DK.ON_PER_STAGE), ``dk_type`` (MODEL.DK.TYPE: any ``DK_CONV_REGISTRY`` name), ``base_type``
(MODEL.DK.BASE_TYPE), ``depthwise`` (MODEL.DK.DEPTHWISE), ``scope_size``, ``rotation_groups``,
``rotation_clip``, ``rotation_clip_range``, ``generator``, ``num_experts``, ``scope_init`` (MODEL.DK.*),
``stem_out_channels``, ``res2_out_channels``, ``width_per_group``, ``num_groups``, ``norm``
(MODEL.RESNETS.*), ``kernel_size`` (3; 5 makes the rigid control with a 5x5 scope's support), and
timm's ``num_classes``, ``in_chans``, ``global_pool``, ``drop_rate``. Defaults are
``add_dk_config``'s.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
from detectron2.modeling.backbone.resnet import BasicStem
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from ..layers.registry import DKOptions
from ..modeling.backbone.resnet_dk import NUM_BLOCKS_PER_STAGE, make_resnet_dk_stages
from .checkpoint_filter import checkpoint_filter_fn
from .pretrained_cfgs import classification_cfg

__all__ = ["DKResNet"]

STAGE_NAMES = ("res2", "res3", "res4", "res5")


class DKResNet(nn.Module):
    """A (depthwise) ResNet whose 3x3 convs follow the DK options, with timm's model interface.

    Input [B, in_chans, H, W]; ``forward_features`` returns res5's [B, num_features, H/32, W/32],
    ``forward`` the logits [B, num_classes] (or pooled features when ``num_classes`` is 0).
    """

    def __init__(
        self,
        depth: int = 50,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        *,
        on_per_stage: Sequence[bool] = (False, True, True, True),
        dk_type: str = "deform_kernel",
        base_type: str = "rigid_conv",
        depthwise: bool = True,
        kernel_size: int = 3,
        scope_size: int = DKOptions.scope_size,
        rotation_groups: int = DKOptions.rotation_groups,
        rotation_clip: str = DKOptions.rotation_clip,
        rotation_clip_range: Tuple[float, float] = DKOptions.rotation_clip_range,
        generator: str = DKOptions.generator,
        num_experts: int = DKOptions.num_experts,
        scope_init: str = DKOptions.scope_init,
        stem_out_channels: int = 64,
        res2_out_channels: Optional[int] = None,
        width_per_group: int = 64,
        num_groups: int = 1,
        norm: str = "BN",
    ):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if res2_out_channels is None:
            res2_out_channels = 256 if depth >= 50 else 64
        options = DKOptions(
            scope_size=scope_size,
            rotation_groups=rotation_groups,
            rotation_clip=rotation_clip,
            rotation_clip_range=tuple(rotation_clip_range),
            generator=generator,
            num_experts=num_experts,
            scope_init=scope_init,
        )
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.stem = BasicStem(in_channels=in_chans, out_channels=stem_out_channels, norm=norm)
        stages = make_resnet_dk_stages(
            depth,
            on_per_stage=tuple(bool(v) for v in on_per_stage),
            dk_type=dk_type,
            base_type=base_type,
            depthwise=depthwise,
            dk_options=options,
            norm=norm,
            num_groups=num_groups,
            width_per_group=width_per_group,
            stem_out_channels=stem_out_channels,
            res2_out_channels=res2_out_channels,
            kernel_size=kernel_size,
        )
        self.feature_info = [dict(num_chs=stem_out_channels, reduction=4, module="stem")]
        reduction = 4
        for index, (name, blocks) in enumerate(zip(STAGE_NAMES, stages)):
            self.add_module(name, nn.Sequential(*blocks))
            reduction *= 1 if index == 0 else 2
            self.feature_info.append(
                dict(num_chs=blocks[-1].out_channels, reduction=reduction, module=name)
            )
        self.num_features = self.head_hidden_size = stages[-1][-1].out_channels
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate
        )

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^stem", blocks=r"^res(\d+)" if coarse else r"^res(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg"):
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def _run_stage(self, name: str, x: torch.Tensor) -> torch.Tensor:
        stage = getattr(self, name)
        if self.grad_checkpointing and name != "stem" and not torch.jit.is_scripting():
            return torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for name in ("stem",) + STAGE_NAMES:
            x = self._run_stage(name, x)
        return x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's feature API: the outputs of the modules of ``feature_info`` (0 stem, 1-4
        res2-res5) picked by ``indices`` (the last n if an int; default all).

        Returns:
            the list of [B, C_i, H / r_i, W / r_i] if ``intermediates_only``, else
            ``(forward_features(x), that list)``. ``norm`` has no effect (no final norm).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        names = ("stem",) + STAGE_NAMES
        intermediates = []
        for index, name in enumerate(names[: max_index + 1] if stop_early else names):
            x = self._run_stage(name, x)
            if index in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """Removes the stages after the last of ``indices`` (and the classifier if
        ``prune_head``), as timm's models do; returns the kept feature indices."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        for name in STAGE_NAMES[max_index:]:
            setattr(self, name, nn.Identity())
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create(variant: str, pretrained: bool, depth: int, **kwargs) -> DKResNet:
    return build_model_with_cfg(
        DKResNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(1, 2, 3, 4)),
        depth=depth,
        **kwargs,
    )


_DK = dict(dk_type="deform_kernel")
_DKDCN = dict(dk_type="deform_kernel_conv")
_RIGID = dict(dk_type="rigid_conv")
_HALF = dict(stem_out_channels=32, res2_out_channels=32)

# name -> (depth, default kwargs, one-line description)
MODEL_SPECS = {
    "resnet50_dw": (50, _RIGID, "ResNet-50 with depthwise 3x3 convs (DW-ResNet-50, rigid)"),
    "dk_resnet50_dw": (50, _DK, "DW-ResNet-50 with Deformable Kernels in res3-res5"),
    "dkdcn_resnet50_dw": (50, _DKDCN, "DW-ResNet-50 with DK + deformable conv in res3-res5"),
    "resnet18_dw": (18, _RIGID, "ResNet-18 with depthwise-separable 3x3 convs (rigid)"),
    "dk_resnet18_dw": (18, _DK, "DW-ResNet-18 with Deformable Kernels in res3-res5"),
    "dkdcn_resnet18_dw": (18, _DKDCN, "DW-ResNet-18 with DK + deformable conv in res3-res5"),
    "resnet18_dw_050": (18, {**_RIGID, **_HALF}, "DW-ResNet-18 at half width (rigid)"),
    "dk_resnet18_dw_050": (18, {**_DK, **_HALF}, "half-width DW-ResNet-18 with DK in res3-res5"),
    "dkdcn_resnet18_dw_050": (18, {**_DKDCN, **_HALF},
                              "half-width DW-ResNet-18 with DK + deformable conv in res3-res5"),
}
assert all(depth in NUM_BLOCKS_PER_STAGE for depth, _, _ in MODEL_SPECS.values())

default_cfgs = generate_default_cfgs(
    {name: classification_cfg(first_conv="stem.conv1", classifier="head.fc", pool_size=(7, 7))
     for name in MODEL_SPECS}
)


def _register(name: str):
    depth, defaults, description = MODEL_SPECS[name]

    def entrypoint(pretrained: bool = False, **kwargs) -> DKResNet:
        return _create(name, pretrained, depth, **{**defaults, **kwargs})

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{description}; keyword arguments as :class:`DKResNet`."
    globals()[name] = register_model(entrypoint)


for _name in MODEL_SPECS:
    _register(_name)
