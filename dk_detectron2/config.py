"""``add_dk_config``: the ``MODEL.DK`` config keys of dk_detectron2."""

from detectron2.config import CfgNode as CN

__all__ = ["add_dk_config"]


def add_dk_config(cfg):
    """Adds ``MODEL.DK.*``, ``MODEL.MOBILENETV2.*`` and ``MODEL.ALLOW_PARTIAL_WEIGHTS`` (defaults
    below) to a Detectron2 config, in place; returns it.

    Call it before ``merge_from_file`` of any dk_detectron2 config. Used by the backbones
    ``build_resnet_dk_backbone`` / ``build_resnet_dk_fpn_backbone`` and the MobileNet-V2 ones.
    """
    _C = cfg
    # Loading MODEL.WEIGHTS: False (default) fails on a checkpoint tensor that fits no parameter
    # and, with --eval-only, on any parameter the checkpoint lacks or any tensor it has in excess;
    # True loads what fits and warns about the rest (Detectron2's behaviour, for fine-tuning).
    _C.MODEL.ALLOW_PARTIAL_WEIGHTS = False
    _C.MODEL.DK = CN()
    # res2..res5: whether that stage's 3x3 convs use MODEL.DK.TYPE (else MODEL.DK.BASE_TYPE).
    _C.MODEL.DK.ON_PER_STAGE = [False, True, True, True]
    # Conv variant of the stages that are on: "rigid_conv" (the rigid conv; "depthwise" is its
    # former name, still accepted), "global_deform_kernel",
    # "deform_kernel", "deform_kernel_conv", "deform_conv" or "cond_conv" (DK_CONV_REGISTRY).
    _C.MODEL.DK.TYPE = "deform_kernel"
    # Conv variant of the stages that are off (any DK_CONV_REGISTRY name).
    _C.MODEL.DK.BASE_TYPE = "rigid_conv"
    # True: 3x3 convs are depthwise (the paper's DW-ResNet); False: groups = MODEL.RESNETS.NUM_GROUPS.
    _C.MODEL.DK.DEPTHWISE = True
    # S, side of the scope each 3x3 kernel is sampled from (>= 3). With S - 3 even (5) the
    # zero-rotation taps sit on scope cells: the scope then trains like a 3x3 conv until its taps
    # move, and a 3x3 checkpoint converts into it exactly (docs/results_shapes.md).
    _C.MODEL.DK.SCOPE_SIZE = 5
    # G, blocks of output channels sharing one rotation (must divide the conv's channels).
    _C.MODEL.DK.ROTATION_GROUPS = 1
    # Rotation clipping: "scope" (taps stay inside the scope), "range" (ROTATION_CLIP_RANGE) or
    # "none" (a tap pushed outside reads zero and gets no gradient back: layers can die).
    _C.MODEL.DK.ROTATION_CLIP = "scope"
    # (low, high) bounds of every rotation when ROTATION_CLIP is "range".
    _C.MODEL.DK.ROTATION_CLIP_RANGE = [-1.0, 1.0]
    # Learning-rate factor of the generators that predict rotations and offsets. At 1 rotations
    # swing outside the scope early in training; at 0.1 many taps pile up on the scope's edge
    # (from scratch: 18.4 % with scope 5, 34.0 % with scope 4; docs/results/edge_taps/); 0.01
    # keeps them within a fraction of a cell of the rigid grid.
    _C.MODEL.DK.GENERATOR_LR_FACTOR = 0.01
    # Generator of the local DK variants: "full" (a K x K conv from all input channels) or
    # "separable" (depthwise K x K + 1 x 1, about 1/6 of the weights); dk_detectron2.layers.generators.
    _C.MODEL.DK.GENERATOR = "full"
    # How a fresh DK scope is filled: "full" (every cell like a 3x3 kernel's weight) or "grid"
    # (only the cells the zero-rotation taps read; the outer ring starts at zero, so a tap that
    # moves blends towards zero, not towards untrained weights). Checkpoints are unaffected.
    _C.MODEL.DK.SCOPE_INIT = "full"
    # Iterations at the start of training during which the generators do not learn (lr 0): the
    # kernels train as rigid ones first. 0 disables the warm-up (DKTrainer, GeneratorWarmup hook).
    _C.MODEL.DK.GENERATOR_WARMUP_ITERS = 0
    # E, experts of "cond_conv".
    _C.MODEL.DK.NUM_EXPERTS = 4

    # The MobileNet-V2 backbones (build_dk_mobilenetv2_backbone, build_dk_mobilenetv2_fpn_backbone;
    # MODEL.DK says which depthwise convs are Deformable Kernels).
    _C.MODEL.MOBILENETV2 = CN()
    # Channel multiplier: 1.0, 0.75 and 0.5 are timm's mobilenetv2_100 / _075 / _050.
    _C.MODEL.MOBILENETV2.WIDTH = 1.0
    # "FrozenBN" (statistics and affine fixed, as Detectron2's ResNets from ImageNet), "BN" or
    # "SyncBN".
    _C.MODEL.MOBILENETV2.NORM = "FrozenBN"
    # Stages returned: stem (stride 2), res2 (4), res3 (8), res4 (16), res5 (32).
    _C.MODEL.MOBILENETV2.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # K of the depthwise convs in the stages MODEL.DK.ON_PER_STAGE turns on (odd; MobileNet-V2's
    # own is 3). 5 with MODEL.DK.TYPE "rigid_conv" is the rigid control with a 5x5 scope's support.
    _C.MODEL.MOBILENETV2.KERNEL_SIZE = 3
    # How those depthwise convs start before any weights load: "msra" (Detectron2's c2_msra_fill,
    # the rigid conv included, so that it starts where DK's layer starts) or "rigid_pytorch" (the
    # rigid conv keeps PyTorch's default init; DEPTHWISE_INITS in classification/mobilenetv2.py).
    _C.MODEL.MOBILENETV2.DEPTHWISE_INIT = "msra"
    return cfg
