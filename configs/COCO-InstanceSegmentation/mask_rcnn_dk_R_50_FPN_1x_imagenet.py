"""LazyConfig twin of mask_rcnn_dk_R_50_FPN_1x_imagenet.yaml (from an ImageNet-pretrained
dk_resnet50_dw; load train.init_checkpoint with dk_detectron2.checkpoint.DKCheckpointer)."""
from ..common.dk_rcnn_fpn_timm_imagenet import dataloader, model, optimizer, train
from ..common.dk_rcnn_fpn_timm_imagenet import lr_multiplier_1x as lr_multiplier

model.backbone.bottom_up.stages.dk_type = "deform_kernel"
# a placeholder: the checkpoint python -m dk_detectron2.classification.train wrote
train.init_checkpoint = "output/classification/dk_resnet50_dw/model_best.pth.tar"
