"""Shared pieces of the DK R-CNN LazyConfigs that start from the model zoo's ImageNet ResNets: the
LazyConfig twin of ../Base-DK-ImageNet-RCNN-FPN.yaml, imported by the ``*_c3-c5.py`` files in
../COCO-InstanceSegmentation/ and ../COCO-Detection/.

It is Detectron2's R50-FPN Mask R-CNN LazyConfig (``COCO-InstanceSegmentation/
mask_rcnn_R_50_FPN_1x.py``) built from Detectron2's own ``common/`` pieces, as its
``new_baselines`` are, with one change: the ResNet's stages come from
:func:`dk_detectron2.modeling.make_resnet_dk_stages`, full (groups 1) Deformable Kernels in the
3x3 convs of res3-res5. FrozenBN and the frozen stem + res2 (``freeze_at=2``) stay as in the model
zoo. ``train.init_checkpoint`` is the model zoo's ImageNet R-50; load it with
``dk_detectron2.checkpoint.DKCheckpointer`` (in place of Detectron2's ``DetectionCheckpointer``),
which turns each 3x3 kernel of res3-res5 into its DK scope.

Names exported: ``model``, ``dataloader``, ``optimizer``, ``train``, ``lr_multiplier_1x``,
``lr_multiplier_3x``.
"""
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from dk_detectron2.layers import DKOptions
from dk_detectron2.modeling import make_resnet_dk_stages
from dk_detectron2.solver import get_dk_optimizer_params

# The DK recipe, in this one place for every LazyConfig that imports this file (the YAML configs
# keep theirs in ../Base-DK-ImageNet-RCNN-FPN.yaml): S - K even, so the converted checkpoint is
# exactly the 3x3 kernel at the scope's centre; taps held inside the scope; generators at 0.01x
# the learning rate.
SCOPE_SIZE = 5
ROTATION_CLIP = "scope"
GENERATOR_LR_FACTOR = 0.01

model = get_config("common/models/mask_rcnn_fpn.py").model
model.backbone.bottom_up.stages = L(make_resnet_dk_stages)(
    depth=50,
    on_per_stage=[False, True, True, True],  # res3-res5, as DCN's c3-c5 configs
    dk_type="deform_kernel",
    base_type="rigid_conv",  # full or grouped, since depthwise=False
    depthwise=False,  # groups = num_groups: 1 for ResNet, 32 for ResNeXt
    dk_options=L(DKOptions)(
        scope_size=SCOPE_SIZE, rotation_groups=1, rotation_clip=ROTATION_CLIP
    ),
    norm="FrozenBN",
    num_groups=1,
    width_per_group=64,
    stride_in_1x1=True,  # the MSRA checkpoints stride in the 1x1
)
model.backbone.bottom_up.freeze_at = 2

dataloader = get_config("common/data/coco.py").dataloader

optimizer = get_config("common/optim.py").SGD
optimizer.params = L(get_dk_optimizer_params)(
    base_lr="${..lr}", generator_lr_factor=GENERATOR_LR_FACTOR, weight_decay_norm=0.0
)

train = get_config("common/train.py").train
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"

_schedules = get_config("common/coco_schedule.py")
lr_multiplier_1x = _schedules.lr_multiplier_1x
lr_multiplier_3x = _schedules.lr_multiplier_3x
