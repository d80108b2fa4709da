"""LazyConfig twin of faster_rcnn_R_50_FPN_1x_dkdcn_c3-c5.yaml
(mirrors Detectron2's COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml)."""
from ..common.dk_rcnn_fpn_imagenet import dataloader, model, optimizer, train
from ..common.dk_rcnn_fpn_imagenet import lr_multiplier_1x as lr_multiplier

# Faster R-CNN: no mask branch, no instance masks loaded.
model.roi_heads.update(mask_in_features=None, mask_pooler=None, mask_head=None)
dataloader.train.mapper.use_instance_mask = False

model.backbone.bottom_up.stages.dk_type = "deform_kernel_conv"  # DK+DCN
