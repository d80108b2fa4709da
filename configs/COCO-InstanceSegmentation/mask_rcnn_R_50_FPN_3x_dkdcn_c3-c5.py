"""LazyConfig twin of mask_rcnn_R_50_FPN_3x_dkdcn_c3-c5.yaml
(mirrors Detectron2's Misc/mask_rcnn_R_50_FPN_3x_dconv_c3-c5.yaml)."""
from ..common.dk_rcnn_fpn_imagenet import dataloader, model, optimizer, train
from ..common.dk_rcnn_fpn_imagenet import lr_multiplier_3x as lr_multiplier

train.max_iter = 270000  # 3x

model.backbone.bottom_up.stages.dk_type = "deform_kernel_conv"  # DK+DCN
