"""LazyConfig twin of mask_rcnn_X_101_32x8d_FPN_3x_dkdcn_c3-c5.yaml
(mirrors Detectron2's COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml)."""
from ..common.dk_rcnn_fpn_imagenet import dataloader, model, optimizer, train
from ..common.dk_rcnn_fpn_imagenet import lr_multiplier_3x as lr_multiplier

train.max_iter = 270000  # 3x

# ResNeXt-101 32x8d (FAIR checkpoint: strides in the 3x3, pixel std of torchvision): grouped DK.
model.backbone.bottom_up.stages.update(
    depth=101, num_groups=32, width_per_group=8, stride_in_1x1=False
)
model.pixel_std = [57.375, 57.120, 58.395]
train.init_checkpoint = "detectron2://ImageNetPretrained/FAIR/X-101-32x8d.pkl"

model.backbone.bottom_up.stages.dk_type = "deform_kernel_conv"  # DK+DCN
