"""LazyConfig of the DK Mask R-CNN (DW-ResNet-50-FPN, local Deformable Kernels in res3-res5,
from scratch with GroupNorm, 3x schedule): the LazyConfig twin of
configs/COCO-InstanceSegmentation/mask_rcnn_dk_R_50_FPN_scratch_3x.yaml.

Use with detectron2's tools/lazyconfig_train_net.py (after ``import dk_detectron2``), or::

    from detectron2.config import LazyConfig, instantiate
    cfg = LazyConfig.load("configs/mask_rcnn_dk_R_50_FPN_scratch_3x.py")
    model = instantiate(cfg.model)

Other variants: set ``model.backbone.bottom_up.stages.dk_type`` to any DK_CONV_REGISTRY name.
The common pieces (model, data, optimizer, schedule, train) are detectron2's own model-zoo
LazyConfigs, read from the installed detectron2.
"""

from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from dk_detectron2.layers import DKOptions
from dk_detectron2.modeling import make_resnet_dk_stages
from dk_detectron2.solver import get_dk_optimizer_params

model = get_config("common/models/mask_rcnn_fpn.py").model
dataloader = get_config("common/data/coco.py").dataloader
optimizer = get_config("common/optim.py").SGD
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_3x
train = get_config("common/train.py").train

# The rotation generators train at 0.01x the learning rate (MODEL.DK.GENERATOR_LR_FACTOR).
optimizer.params = L(get_dk_optimizer_params)(
    base_lr="${..lr}", generator_lr_factor=0.01, weight_decay_norm=0.0
)

# DK stages: depthwise 3x3 convs, local DK (scope 5, taps clipped to it) in res3-res5.
model.backbone.bottom_up.stages = L(make_resnet_dk_stages)(
    depth=50,
    on_per_stage=[False, True, True, True],
    dk_type="deform_kernel",
    base_type="rigid_conv",
    depthwise=True,
    dk_options=L(DKOptions)(scope_size=5, rotation_groups=1, rotation_clip="scope"),
    norm="GN",
    stride_in_1x1=False,
)

# From scratch with GroupNorm (as detectron2's Misc/scratch_mask_rcnn_R_50_FPN_3x_gn.yaml).
train.init_checkpoint = ""
model.backbone.bottom_up.freeze_at = 0
model.backbone.bottom_up.stem.norm = "GN"
model.backbone.norm = "GN"
model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]
model.roi_heads.box_head.fc_dims = [1024]
model.roi_heads.box_head.conv_norm = "GN"
model.roi_heads.mask_head.conv_norm = "GN"
train.max_iter = 270000
