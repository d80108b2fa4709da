"""Each ImageNet-pretrained COCO config (``*_dk_c3-c5`` / ``*_dkdcn_c3-c5``) loads a checkpoint in
the model zoo's own ``.pkl`` format, reproduces the rigid Detectron2 model built from the same
checkpoint at zero rotation, and trains under FrozenBN.

No weights can be downloaded here, so the checkpoints are written with random values under the
model zoo's names and shapes (``_model_zoo_checkpoints.py``: R-50, R-101, X-101-32x8d). For each
config:

- the DK model is built from the config and loaded with ``DKCheckpointer`` (one log line per
  converted stage); the rigid model is Detectron2's own config of the same architecture loaded with
  Detectron2's ``DetectionCheckpointer``. The heads (not in an ImageNet checkpoint) are copied from
  the rigid model, so that the two differ only in res3-res5's 3x3 convs.
- backbone features (p2-p6), proposals, boxes, scores, classes and mask probabilities of the whole
  R-CNN must agree to float32 rounding (relative error < 1e-5; measured ~1e-7 to 1e-6).
- two SGD steps on two 64x64 images: losses finite, stem and res2 frozen, every FrozenBN
  unchanged, DK scopes and generators (rotations; offsets for DK+DCN) trained.
"""
import contextlib
import logging
import os
import sys

import pytest
import torch
from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import dk_detectron2  # noqa: F401  (registers the DK backbones)
from dk_detectron2 import add_dk_config
from dk_detectron2.checkpoint import DKCheckpointer
from dk_detectron2.engine import DKTrainer
from dk_detectron2.layers import DeformKernel2d, DeformKernelConv2d
from dk_detectron2.solver import generator_parameter_names

from _model_zoo_checkpoints import CHECKPOINTS, COCO_PRETRAINED_CONFIGS, write_model_zoo_pkl
from _training_inputs import two_training_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-5  # relative to the largest magnitude of each compared output
# Small test-time settings shared by the DK and the rigid model (scores of random heads are low).
TEST_OPTS = ["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
             "MODEL.RPN.POST_NMS_TOPK_TEST", "200", "TEST.DETECTIONS_PER_IMAGE", "20"]
ERRORS = {}  # config -> {output: relative error}, printed at the end of the module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """MODEL.WEIGHTS -> a model-zoo-format .pkl of random weights (written on first use)."""
    folder, paths = tmp_path_factory.mktemp("model_zoo"), {}

    def get(weights):
        if weights not in paths:
            name = os.path.basename(weights)
            paths[weights] = write_model_zoo_pkl(folder / name, **CHECKPOINTS[weights])
        return paths[weights]

    return get


@pytest.fixture(scope="module")
def rigid_model(checkpoint):
    """Detectron2 config path -> its rigid model loaded from the checkpoint it names (the last
    one is kept: the configs sharing a rigid model are tested one after the other)."""
    cache = {}

    def get(path):
        if path not in cache:
            cache.clear()
            cfg = get_cfg()
            cfg.merge_from_file(model_zoo.get_config_file(path))
            cfg.merge_from_list(TEST_OPTS)
            torch.manual_seed(0)
            model = build_model(cfg).eval()
            DetectionCheckpointer(model).load(checkpoint(cfg.MODEL.WEIGHTS))
            cache[path] = model
        return cache[path]

    yield get
    if ERRORS:  # the measured reproduction errors (shown with -s)
        print("\nrelative reproduction errors, DK vs rigid (max |difference| / max |rigid|):")
        for name, errors in ERRORS.items():
            print(f"  {name}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))


@contextlib.contextmanager
def _checkpointer_log():
    """Collects the INFO messages of fvcore's checkpointer logger (which Detectron2's
    ``setup_logger`` may have detached from the root logger)."""
    lines, logger = [], logging.getLogger("fvcore.common.checkpoint")
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _load_dk_config(name):
    cfg = get_cfg()
    add_dk_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", name + ".yaml"))
    cfg.merge_from_list(TEST_OPTS)
    return cfg


def _run(model, image):
    """Inference on one image: (FPN features, proposals, detections before resizing)."""
    seen = {}
    hooks = [
        model.backbone.register_forward_hook(
            lambda m, i, out: seen.__setitem__("features", out)
        ),
        model.proposal_generator.register_forward_hook(
            lambda m, i, out: seen.__setitem__("proposals", out[0][0])
        ),
    ]
    try:
        with torch.no_grad():
            detections = model.inference(
                [{"image": image, "height": image.shape[1], "width": image.shape[2]}],
                do_postprocess=False,
            )[0]
    finally:
        for hook in hooks:
            hook.remove()
    return seen["features"], seen["proposals"], detections


def _relative(got, expected):
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    return float((got - expected).abs().max()) / max(scale, 1e-12) if expected.numel() else 0.0


def _pairing(boxes, reference):
    """For each box, the index of the nearest reference box (the order of outputs whose scores
    tie to float32 rounding may differ between two equal models)."""
    return torch.cdist(boxes, reference, p=float("inf")).argmin(dim=1)


def _compare(dk_out, rigid_out):
    """Relative errors of every output of the DK model against the rigid model's."""
    (features, proposals, detections), (ref_features, ref_proposals, ref_detections) = (
        dk_out, rigid_out)
    errors = {"features": max(_relative(features[k], ref_features[k]) for k in ref_features)}
    assert len(proposals) == len(ref_proposals) > 0
    index = _pairing(proposals.proposal_boxes.tensor, ref_proposals.proposal_boxes.tensor)
    errors["proposal boxes"] = _relative(
        proposals.proposal_boxes.tensor, ref_proposals.proposal_boxes.tensor[index])
    errors["objectness"] = _relative(
        proposals.objectness_logits, ref_proposals.objectness_logits[index])
    assert len(detections) == len(ref_detections) > 0
    index = _pairing(detections.pred_boxes.tensor, ref_detections.pred_boxes.tensor)
    assert torch.equal(detections.pred_classes, ref_detections.pred_classes[index])
    errors["boxes"] = _relative(
        detections.pred_boxes.tensor, ref_detections.pred_boxes.tensor[index])
    errors["scores"] = _relative(detections.scores, ref_detections.scores[index])
    if ref_detections.has("pred_masks"):
        errors["masks"] = _relative(detections.pred_masks, ref_detections.pred_masks[index])
    return errors


def _train_steps(model, cfg, steps=2):
    """``steps`` SGD steps with DKTrainer's optimizer; returns the last losses."""
    model.proposal_generator.post_nms_topk[True] = 64
    model.roi_heads.batch_size_per_image = 32
    optimizer = DKTrainer.build_optimizer(cfg, model)
    model.train()
    for step in range(steps):
        with EventStorage(step):
            losses = model(two_training_images())
        total = sum(losses.values())
        assert torch.isfinite(total), losses
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    return losses, optimizer


@pytest.mark.parametrize("name", list(COCO_PRETRAINED_CONFIGS), ids=os.path.basename)
def test_config_loads_the_model_zoo_pkl_reproduces_the_rigid_model_and_trains(
    name, checkpoint, rigid_model
):
    _, rigid_path = COCO_PRETRAINED_CONFIGS[name]
    rigid = rigid_model(rigid_path)
    cfg = _load_dk_config(name)
    model = build_model(cfg).eval()
    with _checkpointer_log() as lines:
        DKCheckpointer(model).load(checkpoint(cfg.MODEL.WEIGHTS))
    stage_lines = [line for line in lines if "[DKCheckpointer]" in line]
    assert [line.split(", ")[1].split(":")[0] for line in stage_lines] == ["res3", "res4", "res5"]
    assert all("-> 5x5 DK scopes, exact" in line for line in stage_lines), stage_lines

    bottom_up = model.backbone.bottom_up
    dk_class = DeformKernelConv2d if "_dkdcn_" in name else DeformKernel2d
    for stage in ("res3", "res4", "res5"):
        for block in getattr(bottom_up, stage):
            assert type(block.conv2) is dk_class
            assert block.conv2.groups == cfg.MODEL.RESNETS.NUM_GROUPS  # full / ResNeXt-grouped
            assert isinstance(block.conv2.norm, FrozenBatchNorm2d)
    assert type(bottom_up.res2[0].conv2).__name__ == "Conv2d"

    # Heads and FPN are not in an ImageNet checkpoint: take the rigid model's.
    heads = {k: v for k, v in rigid.state_dict().items() if not k.startswith("backbone.bottom_up.")}
    incompatible = model.load_state_dict(heads, strict=False)
    assert not incompatible.unexpected_keys
    assert all(k.startswith("backbone.bottom_up.") for k in incompatible.missing_keys)

    image = torch.randint(0, 256, (3, 96, 128), generator=torch.Generator().manual_seed(1))
    errors = _compare(_run(model, image.float()), _run(rigid, image.float()))
    ERRORS[os.path.basename(name)] = errors
    assert max(errors.values()) < TOLERANCE, errors

    # Training under FrozenBN: stem and res2 frozen, every BN a frozen affine map, DK trains.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generators = generator_parameter_names(model)
    assert generators and all(model.get_parameter(n).requires_grad for n in generators)
    losses, optimizer = _train_steps(model, cfg)
    assert ("loss_mask" in losses) == cfg.MODEL.MASK_ON
    lr = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    scope = bottom_up.res4[0].conv2.weight
    rotation = bottom_up.res4[0].conv2.rotation_conv.weight
    assert lr[id(rotation)] == pytest.approx(cfg.MODEL.DK.GENERATOR_LR_FACTOR * lr[id(scope)])
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    frozen = [k for k in before if k.startswith(("backbone.bottom_up.stem.",
                                                 "backbone.bottom_up.res2."))]
    assert frozen and not changed & set(frozen)
    assert not any(k.endswith(("running_mean", "running_var")) for k in changed)
    assert not any(".norm." in k and k.startswith("backbone.bottom_up.") for k in changed)
    for stage in ("res3", "res4", "res5"):
        assert f"backbone.bottom_up.{stage}.0.conv2.weight" in changed
        assert f"backbone.bottom_up.{stage}.0.conv2.rotation_conv.weight" in changed
        if dk_class is DeformKernelConv2d:
            assert f"backbone.bottom_up.{stage}.0.conv2.offset_conv.weight" in changed


def test_a_detectron2_pth_of_the_rigid_model_loads_whole(tmp_path, checkpoint, rigid_model):
    """A rigid Detectron2 R-CNN ``.pth`` (e.g. a COCO-trained model zoo model) converts into the
    DK config as a whole, heads included, and reproduces it."""
    name = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_dk_c3-c5"
    rigid = rigid_model(COCO_PRETRAINED_CONFIGS[name][1])
    DetectionCheckpointer(rigid, save_dir=str(tmp_path)).save("rigid")
    model = build_model(_load_dk_config(name)).eval()
    DKCheckpointer(model).load(str(tmp_path / "rigid.pth"))
    image = torch.randint(0, 256, (3, 64, 96), generator=torch.Generator().manual_seed(2))
    errors = _compare(_run(model, image.float()), _run(rigid, image.float()))
    assert max(errors.values()) < TOLERANCE, errors


def test_train_net_trains_a_new_config_from_a_model_zoo_pkl(tmp_path, checkpoint):
    """``train_net.py --config-file <config> MODEL.WEIGHTS <pkl>``, as the README writes it, on a
    tiny dataset: the checkpoint is converted (one line per stage) and training runs."""
    sys.path.insert(0, ROOT)
    import train_net
    from dk_detectron2.data import ShapesSpec, register_shapes_dataset

    dataset = "dk_shapes_coco_pretrained"
    register_shapes_dataset(dataset, str(tmp_path / "data"), "train",
                            ShapesSpec(num_images=2, image_size=64, max_objects=1))
    weights = checkpoint("detectron2://ImageNetPretrained/MSRA/R-50.pkl")
    config = os.path.join(ROOT, "configs", "COCO-InstanceSegmentation",
                          "mask_rcnn_R_50_FPN_1x_dk_c3-c5.yaml")
    args = train_net.argument_parser().parse_args([
        "--config-file", config, "MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu",
        "DATASETS.TRAIN", f"('{dataset}',)", "DATASETS.TEST", "()",
        "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "OUTPUT_DIR", str(tmp_path / "out"),
    ])
    train_net.main(args)
    with open(tmp_path / "out" / "log.txt") as log:  # Detectron2's default_setup writes it
        lines = [line for line in log if "INFO: [DKCheckpointer]" in line]
    assert len(lines) == 3 and all("-> 5x5 DK scopes, exact" in line for line in lines), lines
    final = torch.load(tmp_path / "out" / "model_final.pth", weights_only=False)["model"]
    assert final["backbone.bottom_up.res3.0.conv2.weight"].shape[-2:] == (5, 5)
