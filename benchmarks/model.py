"""Model level: Mask R-CNN R50-FPN with the DK backbone against the same model with plain convs.

Both models come from one config -- ``--model-config`` if given, else the first
``configs/COCO-InstanceSegmentation/mask_rcnn_dk_R_50_FPN*.yaml``, else Detectron2's
``mask_rcnn_R_50_FPN_1x.yaml`` with ``add_dk_config`` and ``build_resnet_dk_fpn_backbone`` -- the
plain one with ``MODEL.DK.TYPE = "rigid_conv"`` (the rigid convolution of the same architecture).
Weights are random (seeded) and every DK rotation generator gets small random weights, as after
training. One fixed-size image (``--model-size``); one class's logit is raised so that, as a
trained detector, both models keep up to ``TEST.DETECTIONS_PER_IMAGE`` boxes and run their mask
heads on them. The training step (forward, losses, backward, SGD step) uses one image with three
boxes and masks, and a fixed seed for the proposal sampling. Inference and training of both
models are timed round-robin. By default the heads are shrunk (:data:`LIGHT_HEADS`: 100
proposals, 20 detections): the 4conv1fc box head on 1000 proposals alone costs ~230 GFLOP, which
on a shared 2-core machine takes most of a minute per image and dilutes the backbone's
difference; ``--model-full-heads`` measures the config as it is.
"""

import glob
import os

import torch

from .measure import ratio, time_interleaved

_ZOO_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
PLAIN_TYPE = "rigid_conv"


def find_config(explicit=None):
    """The DK Mask R-CNN R50-FPN config to benchmark, or None (then built in code)."""
    if explicit:
        return explicit
    from dk_detectron2.model_zoo import get_config_dir

    pattern = os.path.join(get_config_dir(), "COCO-InstanceSegmentation",
                           "mask_rcnn_dk_R_50_FPN*.yaml")
    candidates = sorted(glob.glob(pattern))
    return candidates[0] if candidates else None


# Head sizes of the default (light-head) measurement: the heads cost the same in both models, so
# shrinking them only raises DK/plain -- the ratio measured this way bounds the as-configured one
# from above, and runs in a fraction of the time. ``--model-full-heads`` keeps the config's.
LIGHT_HEADS = {
    "MODEL.RPN.POST_NMS_TOPK_TEST": 100,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": 100,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 64,
    "TEST.DETECTIONS_PER_IMAGE": 20,
}

# --quick (tests): tiny heads, so the section runs in seconds.
QUICK_HEADS = {
    "MODEL.RPN.POST_NMS_TOPK_TEST": 16,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": 16,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 16,
    "TEST.DETECTIONS_PER_IMAGE": 4,
}


def build_config(config_path, dk_type, heads=None):
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    from dk_detectron2.config import add_dk_config

    cfg = get_cfg()
    add_dk_config(cfg)
    if config_path:
        cfg.merge_from_file(config_path)
    else:
        cfg.merge_from_file(model_zoo.get_config_file(_ZOO_CONFIG))
        cfg.MODEL.BACKBONE.NAME = "build_resnet_dk_fpn_backbone"
    if dk_type is not None:
        cfg.MODEL.DK.TYPE = dk_type
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    if heads:
        cfg.merge_from_list([item for pair in heads.items() for item in pair])
    return cfg


def build_benchmark_model(cfg):
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(cfg)
    # Random weights score every class near 1/81, below the test threshold, which would skip
    # the mask head; a trained detector keeps ~100 boxes. Raising one class's logit makes every
    # proposal a confident detection of that class, so NMS and the mask head see as many boxes
    # as after training (the same in both models).
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[0] += 6.0
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        for name in ("rotation_conv", "offset_conv", "rotation_fc"):
            layer = getattr(module, name, None)
            if layer is not None:
                with torch.no_grad():
                    layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 1e-3)
    return model


def synthetic_inputs(size: int):
    """One image [3, size, size] (0..255) with three boxes, classes and bit masks."""
    from detectron2.structures import BitMasks, Boxes, Instances

    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, size, size, generator=generator) * 255
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8], [0.2, 0.5, 0.7, 0.95]]) * size
    masks = torch.zeros(3, size, size, dtype=torch.bool)
    for index, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
        masks[index, y0:y1, x0:x1] = True
    instances = Instances((size, size))
    instances.gt_boxes = Boxes(boxes)
    instances.gt_classes = torch.tensor([1, 5, 17])
    instances.gt_masks = BitMasks(masks)
    return (
        [{"image": image, "height": size, "width": size}],
        [{"image": image, "height": size, "width": size, "instances": instances}],
    )


def _inference_fn(model, inputs):
    def run():
        model.eval()
        with torch.no_grad():
            return model(inputs)

    return run


def _training_fn(model, inputs):
    from detectron2.utils.events import EventStorage

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)

    def run():
        model.train()
        torch.manual_seed(0)
        with EventStorage(0):  # the losses log to the current storage
            losses = model(inputs)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return total.detach()

    return run


def model(args, progress):
    size = args.model_size
    result = {"image_size": size, "status": "measured"}
    config_path = find_config(args.model_config)
    heads = {} if args.model_full_heads else QUICK_HEADS if args.quick else LIGHT_HEADS
    try:
        dk_cfg = build_config(config_path, None, heads)
        plain_cfg = build_config(config_path, PLAIN_TYPE, heads)
        models = {"dk": build_benchmark_model(dk_cfg), "plain": build_benchmark_model(plain_cfg)}
    except Exception as error:  # a model that does not build fails the benchmark, saying why
        raise RuntimeError(
            f"the Mask R-CNN benchmark models (config {config_path or _ZOO_CONFIG}) could not "
            f"be built: {type(error).__name__}: {error}"
        ) from error
    result.update(
        config=config_path or f"detectron2 model zoo {_ZOO_CONFIG} + build_resnet_dk_fpn_backbone",
        dk_type=dk_cfg.MODEL.DK.TYPE,
        plain_type=PLAIN_TYPE,
        head_overrides=heads,
        dk_on_per_stage=list(dk_cfg.MODEL.DK.ON_PER_STAGE),
        depthwise=bool(dk_cfg.MODEL.DK.DEPTHWISE),
        scope_size=dk_cfg.MODEL.DK.SCOPE_SIZE,
        backbone=dk_cfg.MODEL.BACKBONE.NAME,
        parameters={k: sum(p.numel() for p in m.parameters()) for k, m in models.items()},
    )
    test_inputs, train_inputs = synthetic_inputs(size)
    callables = {}
    for name, m in models.items():
        callables[f"{name}/inference"] = _inference_fn(m, test_inputs)
        callables[f"{name}/training_step"] = _training_fn(m, train_inputs)
    result["detections"] = {
        name: len(_inference_fn(m, test_inputs)()[0]["instances"]) for name, m in models.items()
    }
    bar = progress(total=args.model_repeats, desc="model (Mask R-CNN)")
    measured = time_interleaved(
        callables, args.model_repeats, 0.0, device="cpu", on_round=lambda: bar.update(1)
    )
    bar.close()
    result["timings"] = {key: m.to_dict() for key, m in measured.items()}
    result["comparisons"] = []
    for task in ("inference", "training_step"):
        dk, plain = measured[f"dk/{task}"], measured[f"plain/{task}"]
        result["comparisons"].append({
            "task": task,
            "dk_median_ms": dk.median_ms,
            "plain_median_ms": plain.median_ms,
            "dk_min_ms": dk.min_ms,
            "plain_min_ms": plain.min_ms,
            **ratio(dk, plain),
        })
    return result
