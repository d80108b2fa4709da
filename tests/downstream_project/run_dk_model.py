#!/usr/bin/env python
"""A downstream Detectron2 project using dk_detectron2: ``import dk_detectron2`` is all it needs.

It builds the DK Mask R-CNN of a dk_detectron2 config with Detectron2's own ``build_model``, runs
one training step on a synthetic image with one object, then inference, and prints
"downstream project OK". Run it from anywhere, with dk_detectron2 installed or on PYTHONPATH::

    python tests/downstream_project/run_dk_model.py --config-file configs/shapes/mask_rcnn_dk_R18_FPN_shapes.yaml
"""
import argparse

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

import dk_detectron2  # registers the DK backbones, the MODEL.DK keys helper and dk_shapes
from dk_detectron2.solver import build_dk_optimizer


def tiny_config(config_file: str):
    cfg = get_cfg()
    dk_detectron2.add_dk_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu",
        "MODEL.RESNETS.STEM_OUT_CHANNELS", "8", "MODEL.RESNETS.RES2_OUT_CHANNELS", "8",
        "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "16",  # GN needs 32 groups
        "MODEL.ROI_BOX_HEAD.CONV_DIM", "32", "MODEL.ROI_MASK_HEAD.CONV_DIM", "32",
    ])
    cfg.freeze()
    return cfg


def synthetic_input(size: int = 64):
    image = torch.rand(3, size, size) * 255
    instances = Instances((size, size))
    instances.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 40.0, 50.0]]))
    instances.gt_classes = torch.tensor([1])
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[0, 12:50, 10:40] = True
    instances.gt_masks = BitMasks(mask)
    return {"image": image, "height": size, "width": size, "instances": instances}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True)
    cfg = tiny_config(parser.parse_args().config_file)
    model = build_model(cfg)
    dk_layers = [m for m in model.modules() if type(m).__name__ in ("DeformKernel2d", "DeformKernelConv2d")]
    assert dk_layers or cfg.MODEL.DK.TYPE not in ("deform_kernel", "deform_kernel_conv"), \
        "the config asks for Deformable Kernels but the model has none"
    batch = [synthetic_input(), synthetic_input()]
    optimizer = build_dk_optimizer(cfg, model)  # Detectron2's SGD, generators at MODEL.DK.GENERATOR_LR_FACTOR x the lr
    model.train()
    with EventStorage(0):
        losses = model(batch)
    total = sum(losses.values())
    total.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        outputs = model([{"image": batch[0]["image"], "height": 64, "width": 64}])
    print(f"{len(dk_layers)} {cfg.MODEL.DK.TYPE} layers; losses "
          + ", ".join(f"{k}={v.item():.3f}" for k, v in losses.items())
          + f"; {len(outputs[0]['instances'])} detections")
    print("downstream project OK")


if __name__ == "__main__":
    main()
