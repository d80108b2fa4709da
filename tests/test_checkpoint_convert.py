"""Converting standard ResNet checkpoints into DK scopes (dk_detectron2.checkpoint): state dicts of
small synthetic models, loading through DKCheckpointer, source formats."""
import pickle

import pytest
import torch
from torch import nn

from dk_detectron2.checkpoint import (
    CheckpointMismatchError,
    CheckpointShapeError,
    DKCheckpointer,
    convert_state_dict,
    detect_source_format,
    format_conversion_report,
    rename_to_detectron2,
    sample_scope,
)


class _ScopeConv(nn.Module):
    """Stands for a DK layer: a scope parameter and a (zero) generator absent from checkpoints."""

    def __init__(self, channels: int, scope_size: int):
        super().__init__()
        self.kernel_size = (3, 3)
        self.weight = nn.Parameter(torch.zeros(channels, channels, scope_size, scope_size))
        self.rotation_conv = nn.Conv2d(channels, 18, 3, padding=1)


def _tiny_dk_model(scope_size: int = 4) -> nn.Module:
    """Parameters named as a Detectron2 model with one bottleneck in res3."""
    block = nn.Module()
    block.conv1 = nn.Conv2d(8, 4, 1, bias=False)
    block.conv2 = _ScopeConv(4, scope_size)
    block.conv3 = nn.Conv2d(4, 8, 1, bias=False)
    bottom_up = nn.Module()
    bottom_up.res3 = nn.Sequential(block)
    backbone = nn.Module()
    backbone.bottom_up = bottom_up
    model = nn.Module()
    model.backbone = backbone
    return model


def _tiny_checkpoint(kernel_shape=(4, 4, 3, 3)):
    return {
        "res3.0.conv1.weight": torch.randn(4, 8, 1, 1),
        "res3.0.conv2.weight": torch.randn(*kernel_shape),
        "res3.0.conv3.weight": torch.randn(8, 4, 1, 1),
        "linear.weight": torch.randn(10, 8),
    }


def test_convert_state_dict_matches_names_and_converts_scopes():
    model = _tiny_dk_model()
    checkpoint = _tiny_checkpoint()
    result = convert_state_dict(checkpoint, model)
    name = "backbone.bottom_up.res3.0.conv2.weight"
    assert [layer.name for layer in result.converted] == [name]
    layer = result.converted[0]
    assert layer.source_name == "res3.0.conv2.weight"
    assert layer.source_shape == (4, 4, 3, 3) and layer.target_shape == (4, 4, 4, 4)
    assert layer.error < 1e-5
    assert result.state_dict[name].shape == (4, 4, 4, 4)
    torch.testing.assert_close(
        sample_scope(result.state_dict[name], 3), checkpoint["res3.0.conv2.weight"]
    )
    assert sorted(result.copied) == [
        "backbone.bottom_up.res3.0.conv1.weight", "backbone.bottom_up.res3.0.conv3.weight"
    ]
    assert result.unmatched == ["linear.weight"]
    report = format_conversion_report(result)
    assert name in report and "1 kernel(s) converted" in report


def test_convert_state_dict_accepts_target_shapes_and_numpy():
    checkpoint = {k: v.numpy() for k, v in _tiny_checkpoint().items()}
    shapes = {"res3.0.conv2.weight": (4, 4, 5, 5), "res3.0.conv1.weight": (4, 8, 1, 1)}
    result = convert_state_dict(checkpoint, shapes, match_by_suffix=False)
    assert result.state_dict["res3.0.conv2.weight"].shape == (4, 4, 5, 5)
    assert result.converted[0].error == 0.0  # S - K even: an exact placement


@pytest.mark.parametrize(
    "kernel_shape,target_hint",
    [((4, 4, 5, 5), "at least as large"), ((4, 2, 3, 3), "[4, 2, 3, 3]")],
)
def test_mismatched_checkpoint_raises_and_leaves_the_model_unchanged(tmp_path, kernel_shape,
                                                                    target_hint):
    model = _tiny_dk_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint = _tiny_checkpoint(kernel_shape)
    path = tmp_path / "bad.pth"
    torch.save({"model": checkpoint, "matching_heuristics": True}, path)
    with pytest.raises(CheckpointShapeError) as error:
        DKCheckpointer(model).load(str(path))
    message = str(error.value)
    assert "backbone.bottom_up.res3.0.conv2.weight" in message
    assert str(list(kernel_shape)) in message and "[4, 4, 4, 4]" in message
    assert target_hint in message and "nothing was converted or loaded" in message
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_skip_mismatched_keeps_detectron2_behaviour(tmp_path):
    model = _tiny_dk_model()
    checkpoint = _tiny_checkpoint()
    checkpoint["res3.0.conv3.weight"] = torch.randn(8, 5, 1, 1)
    path = tmp_path / "partial.pth"
    torch.save({"model": checkpoint, "matching_heuristics": True}, path)
    DKCheckpointer(model, skip_mismatched=True).load(str(path))
    loaded = model.backbone.bottom_up.res3[0]
    assert torch.equal(loaded.conv1.weight, checkpoint["res3.0.conv1.weight"])
    torch.testing.assert_close(sample_scope(loaded.conv2.weight, 3),
                               checkpoint["res3.0.conv2.weight"])


def test_dk_scopes_of_another_size_are_refused_in_training_too(tmp_path):
    """A scope-4 DK checkpoint into a scope-5 model: the 4x4 scopes are not 3x3 kernels, so
    converting them would be junk; without strict loading (training) it is refused all the same,
    and with ``skip_mismatched`` those scopes are left out and the rest loads."""
    checkpoint = _tiny_checkpoint((4, 4, 4, 4))
    path = tmp_path / "scope4.pth"
    torch.save({"model": checkpoint, "matching_heuristics": True}, path)
    model = _tiny_dk_model(scope_size=5)
    with pytest.raises(CheckpointMismatchError,
                       match=r"1 DK scopes of another size: backbone\.bottom_up\.res3\.0\.conv2"
                             r"\.weight \(scope \[4, 4\] in the checkpoint, \[5, 5\] in the model\)"):
        DKCheckpointer(model).load(str(path))
    block = model.backbone.bottom_up.res3[0]
    assert not block.conv2.weight.any()  # nothing loaded
    DKCheckpointer(model, skip_mismatched=True).load(str(path))
    assert not block.conv2.weight.any()  # the model's own scope kept
    assert torch.equal(block.conv1.weight, checkpoint["res3.0.conv1.weight"])


def test_detectron2_model_zoo_pkl_and_own_checkpoints_load(tmp_path):
    """A Detectron2-format .pkl (numpy, names without the model's prefix) converts; a checkpoint
    the checkpointer saved itself loads back by exact names."""
    checkpoint = _tiny_checkpoint()
    path = tmp_path / "R-50-d2.pkl"
    with open(path, "wb") as file:
        model_zoo = {k: v.numpy() for k, v in checkpoint.items()}
        pickle.dump({"model": model_zoo, "__author__": "torchvision",
                     "matching_heuristics": True}, file)
    model = _tiny_dk_model()
    checkpointer = DKCheckpointer(model, save_dir=str(tmp_path))
    checkpointer.load(str(path))
    block = model.backbone.bottom_up.res3[0]
    torch.testing.assert_close(sample_scope(block.conv2.weight, 3),
                               checkpoint["res3.0.conv2.weight"])
    assert torch.equal(block.conv1.weight, checkpoint["res3.0.conv1.weight"])
    checkpointer.save("converted")
    reloaded = _tiny_dk_model()
    DKCheckpointer(reloaded).load(str(tmp_path / "converted.pth"))
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name


def test_torchvision_names_map_to_detectron2():
    names = [
        "conv1.weight", "bn1.running_var", "layer1.0.conv2.weight", "layer1.0.bn3.bias",
        "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_mean", "fc.weight",
    ]
    renamed = rename_to_detectron2({name: torch.zeros(1) for name in names}, "torchvision")
    assert list(renamed) == [
        "stem.conv1.weight", "stem.conv1.norm.running_var", "res2.0.conv2.weight",
        "res2.0.conv3.norm.bias", "res3.0.shortcut.weight", "res3.0.shortcut.norm.running_mean",
        "linear.weight",
    ]
    assert detect_source_format({"model": renamed}) == "detectron2"
    assert detect_source_format({"model": dict.fromkeys(names)}) == "torchvision"
    data_parallel = {f"module.{name}": torch.zeros(1) for name in names}
    assert detect_source_format({"model": data_parallel}) == "torchvision"
    result = convert_state_dict(data_parallel, {"res2.0.conv2.weight": (1,)},
                                source_format="torchvision", match_by_suffix=False)
    assert result.copied == ["res2.0.conv2.weight"]
    assert detect_source_format({"model": {}, "__author__": "Caffe2"}) == "caffe2"
    with pytest.raises(ValueError, match="source_format must be one of caffe2, detectron2"):
        rename_to_detectron2({}, "timm")
