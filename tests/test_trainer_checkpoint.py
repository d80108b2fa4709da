"""``train_net.py`` loads ``MODEL.WEIGHTS`` through ``DKCheckpointer`` on both of its paths
(training through ``DKTrainer`` and ``--eval-only``): a rigid checkpoint's 3x3 kernels become DK
scopes that reproduce them, instead of being skipped as shape mismatches, and a checkpoint that
fits neither fails with the layer's name. ``--eval-only`` refuses a checkpoint of another
configuration (unless ``MODEL.ALLOW_PARTIAL_WEIGHTS``) and names an unreadable file."""
import os
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from dk_detectron2 import add_dk_config
from dk_detectron2.checkpoint import (
    CheckpointFileError,
    CheckpointMismatchError,
    CheckpointShapeError,
)
from dk_detectron2.data import ShapesSpec, register_shapes_dataset
from dk_detectron2.engine import DKTrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
import train_net  # noqa: E402
from train_net_driver import CONFIG, TINY_OPTS  # noqa: E402

DATASET = "dk_shapes_trainer_checkpoint"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    register_shapes_dataset(DATASET, str(root), "train",
                            ShapesSpec(num_images=4, image_size=64, max_objects=2))
    return DATASET


def _cfg(tmp_path, dataset, dk_type, scope_size=5, weights=""):
    cfg = get_cfg()
    add_dk_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(TINY_OPTS)
    cfg.merge_from_list([
        "MODEL.DK.TYPE", dk_type, "MODEL.DK.SCOPE_SIZE", str(scope_size), "MODEL.WEIGHTS", weights,
        "DATASETS.TRAIN", f"('{dataset}',)", "DATASETS.TEST", "()",
        "OUTPUT_DIR", str(tmp_path / f"out_{dk_type}_{scope_size}"),
    ])
    return cfg


def _rigid_checkpoint(tmp_path, dataset):
    """A randomly initialised rigid (depthwise) model saved as a Detectron2 .pth; returns both."""
    model = build_model(_cfg(tmp_path, dataset, "rigid_conv"))
    with torch.no_grad():  # BN statistics that differ from the defaults, so they must load
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("rigid")
    return model.eval(), str(tmp_path / "rigid.pth")


def _features(model, seed=0):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.backbone(x)


@pytest.mark.parametrize("scope_size", [4, 5])
def test_trainer_converts_a_rigid_checkpoint_into_dk_scopes(tmp_path, dataset, scope_size):
    rigid, weights = _rigid_checkpoint(tmp_path, dataset)
    trainer = DKTrainer(_cfg(tmp_path, dataset, "deform_kernel", scope_size, weights))
    trainer.resume_or_load(resume=False)
    model = trainer.model.eval()
    scope = model.backbone.bottom_up.res3[0].conv1.depthwise.weight
    assert scope.shape[-2:] == (scope_size, scope_size)
    expected, got = _features(rigid), _features(model)
    for level in expected:
        torch.testing.assert_close(got[level], expected[level], rtol=1e-4, atol=1e-5)


def test_eval_only_converts_a_rigid_checkpoint(tmp_path, dataset, monkeypatch):
    rigid, weights = _rigid_checkpoint(tmp_path, dataset)
    seen = {}
    monkeypatch.setattr(train_net.Trainer, "test",
                        classmethod(lambda cls, cfg, model: seen.setdefault("model", model)))
    args = train_net.argument_parser().parse_args([
        "--config-file", CONFIG, "--eval-only", *TINY_OPTS, "MODEL.DK.SCOPE_SIZE", "5",
        "MODEL.WEIGHTS", weights, "DATASETS.TRAIN", f"('{dataset}',)",
        "DATASETS.TEST", f"('{dataset}',)", "OUTPUT_DIR", str(tmp_path / "eval"),
    ])
    train_net.main(args)
    model = seen["model"].eval()
    expected, got = _features(rigid), _features(model)
    for level in expected:
        torch.testing.assert_close(got[level], expected[level], rtol=1e-4, atol=1e-5)


def test_a_checkpoint_of_another_architecture_fails_naming_the_layer(tmp_path, dataset):
    _, weights = _rigid_checkpoint(tmp_path, dataset)
    cfg = _cfg(tmp_path, dataset, "deform_kernel", 5, weights)
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 16  # every res2 kernel now has another shape
    trainer = DKTrainer(cfg)
    with pytest.raises(CheckpointShapeError, match="res2"):
        trainer.resume_or_load(resume=False)


def _saved_model(tmp_path, dataset, name, *opts):
    """A randomly initialised model of the test config with ``opts``, saved as ``name``.pth."""
    cfg = _cfg(tmp_path, dataset, "deform_kernel")
    cfg.merge_from_list(list(opts))
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save(name)
    return str(tmp_path / f"{name}.pth")


def _eval_only(tmp_path, dataset, monkeypatch, weights, *opts):
    """Runs ``train_net.main --eval-only`` (the evaluation replaced by returning the model)."""
    seen = {}
    monkeypatch.setattr(train_net.Trainer, "test",
                        classmethod(lambda cls, cfg, model: seen.setdefault("model", model)))
    args = train_net.argument_parser().parse_args([
        "--config-file", CONFIG, "--eval-only", *TINY_OPTS, "MODEL.WEIGHTS", weights,
        "DATASETS.TRAIN", f"('{dataset}',)", "DATASETS.TEST", f"('{dataset}',)",
        "OUTPUT_DIR", str(tmp_path / "eval"), *opts,
    ])
    train_net.main(args)
    return seen["model"]


@pytest.mark.parametrize("saved_opts, expected", [
    # DK+DCN checkpoint into a DK model: tensors the model does not have.
    (("MODEL.DK.TYPE", "deform_kernel_conv"), r"checkpoint tensors the model does not have: "
                                             r"backbone\.bottom_up\.res3\.0\.conv1\.depthwise"
                                             r"\.offset_conv"),
    (("MODEL.RESNETS.DEPTH", "34"), r"checkpoint tensors the model does not have: "
                                    r"backbone\.bottom_up\.res2\.2\."),
    (("MODEL.DK.SCOPE_SIZE", "4"), r"DK scopes of another size: backbone\.bottom_up\.res3\.0\."
                                   r"conv1\.depthwise\.weight \(scope \[4, 4\] in the checkpoint, "
                                   r"\[5, 5\] in the model\)"),
    (("MODEL.DK.SCOPE_SIZE", "7"), r"res3\.0\.conv1\.depthwise\.weight"),
])
def test_eval_only_refuses_a_checkpoint_of_another_config(tmp_path, dataset, monkeypatch,
                                                          saved_opts, expected):
    weights = _saved_model(tmp_path, dataset, "other", *saved_opts)
    with pytest.raises(CheckpointShapeError, match=expected):
        _eval_only(tmp_path, dataset, monkeypatch, weights)


def test_eval_only_names_the_parameters_a_checkpoint_lacks(tmp_path, dataset, monkeypatch):
    weights = _saved_model(tmp_path, dataset, "dk")
    with pytest.raises(CheckpointMismatchError,
                       match=r"model tensors missing from it: backbone\.bottom_up\.res3\.0\.conv1"
                             r"\.depthwise\.offset_conv\.weight"):
        _eval_only(tmp_path, dataset, monkeypatch, weights, "MODEL.DK.TYPE", "deform_kernel_conv")


def test_partial_weights_are_an_explicit_choice(tmp_path, dataset, monkeypatch):
    weights = _saved_model(tmp_path, dataset, "dkc", "MODEL.DK.TYPE", "deform_kernel_conv")
    model = _eval_only(tmp_path, dataset, monkeypatch, weights,
                       "MODEL.ALLOW_PARTIAL_WEIGHTS", "True")
    saved = torch.load(weights, weights_only=False)["model"]
    name = "backbone.bottom_up.res3.0.conv1.depthwise.weight"
    assert torch.equal(model.state_dict()[name], saved[name])  # what fits was loaded


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_an_unreadable_checkpoint_is_named(tmp_path, dataset, monkeypatch, damage):
    weights = _saved_model(tmp_path, dataset, "damaged")
    content = open(weights, "rb").read()
    with open(weights, "wb") as f:
        f.write(content[: len(content) // 2] if damage == "truncated" else b"not a checkpoint")
    with pytest.raises(CheckpointFileError, match=f"cannot read the checkpoint {weights}"):
        _eval_only(tmp_path, dataset, monkeypatch, weights)
