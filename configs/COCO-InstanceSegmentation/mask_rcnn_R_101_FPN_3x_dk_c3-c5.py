"""LazyConfig twin of mask_rcnn_R_101_FPN_3x_dk_c3-c5.yaml
(mirrors Detectron2's COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml)."""
from ..common.dk_rcnn_fpn_imagenet import dataloader, model, optimizer, train
from ..common.dk_rcnn_fpn_imagenet import lr_multiplier_3x as lr_multiplier

train.max_iter = 270000  # 3x

model.backbone.bottom_up.stages.depth = 101
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-101.pkl"
