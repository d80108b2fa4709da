"""Shared pieces of the Mask R-CNN LazyConfigs that start from a depthwise ResNet-50 pretrained
by ``python -m dk_detectron2.classification.train``: the LazyConfig twin of
../Base-DK-timm-ImageNet-RCNN-FPN.yaml, imported by ``*_R_50_FPN_1x_imagenet.py`` in
../COCO-InstanceSegmentation/.

Detectron2's R50-FPN Mask R-CNN LazyConfig built from its ``common/`` pieces, with the backbone
as the timm checkpoint was trained: depthwise 3x3 convs (DK / DK+DCN in res3-res5 where the
config says), stride in the 3x3, RGB input normalised with timm's ImageNet mean / std (x 255).
FrozenBN with the stem and res2 frozen, as Detectron2's ImageNet-pretrained configs.
``train.init_checkpoint`` is a placeholder path of the classification checkpoint; load it with
``dk_detectron2.checkpoint.DKCheckpointer`` (in place of Detectron2's ``DetectionCheckpointer``).

Names exported: ``model``, ``dataloader``, ``optimizer``, ``train``, ``lr_multiplier_1x``.
"""
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from dk_detectron2.layers import DKOptions
from dk_detectron2.modeling import make_resnet_dk_stages
from dk_detectron2.solver import get_dk_optimizer_params

# The DK recipe (the classification models' defaults), in this one place for these LazyConfigs.
SCOPE_SIZE = 5
ROTATION_CLIP = "scope"
GENERATOR_LR_FACTOR = 0.01

model = get_config("common/models/mask_rcnn_fpn.py").model
model.backbone.bottom_up.stages = L(make_resnet_dk_stages)(
    depth=50,
    on_per_stage=[False, True, True, True],  # res3-res5, as the dk_/dkdcn_ classification models
    dk_type="deform_kernel",
    base_type="rigid_conv",
    depthwise=True,  # DW-ResNet-50
    dk_options=L(DKOptions)(
        scope_size=SCOPE_SIZE, rotation_groups=1, rotation_clip=ROTATION_CLIP
    ),
    norm="FrozenBN",
    num_groups=1,
    width_per_group=64,
    stride_in_1x1=False,  # the timm models stride in the 3x3
)
model.backbone.bottom_up.freeze_at = 2
# The pixels the backbone was trained on: RGB, timm's ImageNet mean / std scaled to 0-255.
model.input_format = "RGB"
model.pixel_mean = [round(255 * v, 3) for v in IMAGENET_DEFAULT_MEAN]
model.pixel_std = [round(255 * v, 3) for v in IMAGENET_DEFAULT_STD]

dataloader = get_config("common/data/coco.py").dataloader
dataloader.train.mapper.image_format = "RGB"  # the test mapper follows the train mapper's

optimizer = get_config("common/optim.py").SGD
optimizer.params = L(get_dk_optimizer_params)(
    base_lr="${..lr}", generator_lr_factor=GENERATOR_LR_FACTOR, weight_decay_norm=0.0
)

train = get_config("common/train.py").train
train.init_checkpoint = ""  # each config names its checkpoint's path

lr_multiplier_1x = get_config("common/coco_schedule.py").lr_multiplier_1x
