"""Converting standard ResNet checkpoints into DK scopes (dk_detectron2.checkpoint)."""
import pickle
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from torch import nn

from dk_detectron2 import add_dk_config
from dk_detectron2.checkpoint import (
    CheckpointMismatchError,
    CheckpointShapeError,
    DKCheckpointer,
    convert_state_dict,
    detect_source_format,
    format_conversion_report,
    kernel_to_scope,
    rename_to_detectron2,
    reproduction_error,
    sample_scope,
    scope_sampling_matrix,
)
from dk_detectron2.checkpoint.__main__ import main as convert_main
from dk_detectron2.layers import deform_kernel2d
from dk_detectron2.layers.reference import deform_kernel2d_reference


# ------------------------------------------------------------------------------------------------
# kernel_to_scope
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel_size,scope_size", [(3, 3), (3, 4), (3, 5), (3, 6), (1, 2), (5, 8)])
def test_sampling_matrix_is_a_full_rank_bilinear_read(kernel_size, scope_size):
    matrix = scope_sampling_matrix(kernel_size, scope_size)
    assert matrix.shape == (kernel_size, scope_size)
    torch.testing.assert_close(matrix.sum(1), torch.ones(kernel_size, dtype=torch.float64))
    assert torch.linalg.matrix_rank(matrix) == kernel_size
    # Each tap reads at k + (S - K) / 2: the centre of mass of its row.
    positions = matrix @ torch.arange(scope_size, dtype=torch.float64)
    expected = torch.arange(kernel_size, dtype=torch.float64) + (scope_size - kernel_size) / 2
    torch.testing.assert_close(positions, expected)


@pytest.mark.parametrize("difference", [0, 1, 2, 3])
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_converted_scope_reproduces_conv2d_through_reference(difference, stride, padding):
    """The DK reference with zero rotation and the converted scope equals F.conv2d (float64)."""
    generator = torch.Generator().manual_seed(difference)
    kernel = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=generator)
    inputs = torch.randn(2, 4, 9, 8, dtype=torch.float64, generator=generator)
    scope = kernel_to_scope(kernel, 3 + difference)
    assert scope.shape == (6, 4, 3 + difference, 3 + difference)
    assert scope.dtype == torch.float64
    expected = F.conv2d(inputs, kernel, stride=stride, padding=padding)
    rotation = inputs.new_zeros(2, 3 * 3 * 2, *expected.shape[-2:])
    out = deform_kernel2d_reference(inputs, rotation, scope, 3, stride, padding)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert reproduction_error(kernel, scope) < 1e-13


@pytest.mark.parametrize("scope_size", [4, 5])
def test_converted_scope_reproduces_conv2d_through_the_operator(scope_size):
    """Same through the compiled full (groups 1) ``deform_kernel2d``."""
    generator = torch.Generator().manual_seed(scope_size)
    kernel = torch.randn(8, 6, 3, 3, dtype=torch.float64, generator=generator)
    inputs = torch.randn(2, 6, 7, 7, dtype=torch.float64, generator=generator)
    expected = F.conv2d(inputs, kernel, padding=1)
    rotation = inputs.new_zeros(2, 3 * 3 * 2, 7, 7)
    out = deform_kernel2d(inputs, rotation, kernel_to_scope(kernel, scope_size), 3, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_converted_scope_reproduces_grouped_rectangular_kernels():
    """Kh != Kw, Sh - Kh even and Sw - Kw odd, grouped weight."""
    generator = torch.Generator().manual_seed(7)
    kernel = torch.randn(4, 2, 3, 1, dtype=torch.float64, generator=generator)
    inputs = torch.randn(1, 4, 6, 5, dtype=torch.float64, generator=generator)
    scope = kernel_to_scope(kernel, (5, 2))
    expected = F.conv2d(inputs, kernel, padding=(1, 0), groups=2)
    rotation = inputs.new_zeros(1, 3 * 1 * 2, *expected.shape[-2:])
    out = deform_kernel2d_reference(inputs, rotation, scope, (3, 1), 1, (1, 0))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("difference", [0, 2])
def test_even_difference_places_kernel_at_scope_centre(difference):
    kernel = torch.randn(5, 3, 3, 3)
    scope = kernel_to_scope(kernel, 3 + difference)
    margin = difference // 2
    assert torch.equal(scope[..., margin : margin + 3, margin : margin + 3], kernel)
    scope[..., margin : margin + 3, margin : margin + 3] = 0
    assert torch.count_nonzero(scope) == 0


@pytest.mark.parametrize("kernel_size,scope_size", [(3, 4), (3, 6), (5, 6), (2, 5)])
def test_odd_difference_gives_the_minimum_norm_scope(kernel_size, scope_size):
    """Any other scope with the same samples differs by a null-space element and is larger."""
    generator = torch.Generator().manual_seed(scope_size)
    kernel = torch.randn(3, 2, kernel_size, kernel_size, dtype=torch.float64, generator=generator)
    scope = kernel_to_scope(kernel, scope_size)
    sampling = scope_sampling_matrix(kernel_size, scope_size)
    null_space = torch.linalg.svd(sampling).Vh[kernel_size:]  # [S-K, S], sampling @ n = 0
    assert null_space.shape[0] == scope_size - kernel_size
    for _ in range(5):
        # B_h N B_w^T = 0 whenever N's columns (or rows) lie in the null space.
        left = torch.randn(3, 2, scope_size - kernel_size, scope_size, dtype=torch.float64,
                           generator=generator)
        other = scope + null_space.t() @ left
        torch.testing.assert_close(sample_scope(other, kernel_size), kernel)
        assert other.norm() > scope.norm()
        # Minimum norm <=> orthogonal to the null space.
        assert abs(float((scope * (other - scope)).sum())) < 1e-9 * float(other.norm())


def test_kernel_to_scope_float32_error_is_at_rounding_level():
    kernel = torch.randn(64, 32, 3, 3)
    scope = kernel_to_scope(kernel, 4)
    assert scope.dtype == torch.float32
    assert reproduction_error(kernel, scope) < 1e-5 * float(kernel.abs().max())


def test_kernel_to_scope_validates_its_arguments():
    with pytest.raises(ValueError, match=r"scope_size 2x2 must be at least the kernel size 3x3"):
        kernel_to_scope(torch.randn(2, 2, 3, 3), 2)
    with pytest.raises(TypeError, match="floating point"):
        kernel_to_scope(torch.ones(2, 2, 3, 3, dtype=torch.int64), 4)
    with pytest.raises(TypeError, match="scope_size"):
        kernel_to_scope(torch.randn(2, 2, 3, 3), (4, 4, 4))


# ------------------------------------------------------------------------------------------------
# convert_state_dict on small synthetic models
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def _small_torchvision_state_dict():
    return {
        "conv1.weight": torch.randn(8, 3, 7, 7),
        "bn1.weight": torch.rand(8),
        "bn1.num_batches_tracked": torch.tensor(3),
        "layer1.0.conv2.weight": torch.randn(8, 8, 3, 3),
        "layer2.0.conv2.weight": torch.randn(16, 16, 3, 3),
        "layer2.0.bn2.running_mean": torch.randn(16),
        "layer4.1.conv2.weight": torch.randn(32, 32, 3, 3),
    }


def test_cli_converts_the_chosen_stages_and_reports_errors(tmp_path, capsys):
    state_dict = _small_torchvision_state_dict()
    source, target = tmp_path / "resnet.pth", tmp_path / "resnet_dk.pth"
    torch.save(state_dict, source)
    code = convert_main(["--input", str(source), "--output", str(target), "--scope-size", "4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "res3.0.conv2.weight" in printed and "res5.1.conv2.weight" in printed
    assert "2 kernel(s) converted" in printed
    converted = torch.load(target)
    assert converted["matching_heuristics"] is True
    model = converted["model"]
    assert model["res2.0.conv2.weight"].shape == (8, 8, 3, 3)  # res2 is not a DK stage
    assert model["res3.0.conv2.weight"].shape == (16, 16, 4, 4)
    assert model["res5.1.conv2.weight"].shape == (32, 32, 4, 4)
    assert "stem.conv1.norm.weight" in model and "res3.0.conv2.norm.running_mean" in model
    torch.testing.assert_close(
        sample_scope(model["res5.1.conv2.weight"], 3), state_dict["layer4.1.conv2.weight"]
    )


def test_cli_runs_as_a_module(tmp_path, monkeypatch, capsys):
    """``python -m dk_detectron2.checkpoint`` (run in this process with runpy)."""
    source, target = tmp_path / "resnet.pth", tmp_path / "resnet_dk.pth"
    torch.save(_small_torchvision_state_dict(), source)
    monkeypatch.setattr(sys, "argv", [
        "convert", "--input", str(source), "--output", str(target), "--scope-size", "5",
        "--format", "torchvision", "--stages", "res2",
    ])
    monkeypatch.delitem(sys.modules, "dk_detectron2.checkpoint.__main__", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("dk_detectron2.checkpoint", run_name="__main__")
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "res2.0.conv2.weight" in printed and "1 kernel(s) converted" in printed
    assert torch.load(target)["model"]["res2.0.conv2.weight"].shape == (8, 8, 5, 5)


def test_cli_reports_a_checkpoint_that_does_not_fit(tmp_path, capsys):
    source, target = tmp_path / "resnet.pth", tmp_path / "resnet_dk.pth"
    torch.save(_small_torchvision_state_dict(), source)
    code = convert_main(["--input", str(source), "--output", str(target), "--scope-size", "2"])
    assert code == 1
    error = capsys.readouterr().err
    assert "res3.0.conv2.weight" in error
    assert "[16, 16, 3, 3]" in error and "[16, 16, 2, 2]" in error
    assert not target.exists()


def test_cli_takes_target_shapes_from_a_config(tmp_path, capsys):
    source, target = tmp_path / "resnet.pth", tmp_path / "resnet_dk.pth"
    torch.save({"layer2.0.conv2.weight": torch.randn(128, 128, 3, 3),
                "layer1.0.conv2.weight": torch.randn(64, 64, 3, 3)}, source)
    config = str(Path(__file__).resolve().parents[1] / "configs" / "Base-DK-RCNN-FPN.yaml")
    code = convert_main(["--input", str(source), "--output", str(target), "--config-file", config,
                         "MODEL.DK.DEPTHWISE", "False", "MODEL.DK.SCOPE_SIZE", "5"])
    assert code == 0
    assert "1 kernel(s) converted" in capsys.readouterr().out
    model = torch.load(target)["model"]
    assert model["backbone.bottom_up.res3.0.conv2.weight"].shape == (128, 128, 5, 5)
    assert model["backbone.bottom_up.res2.0.conv2.weight"].shape == (64, 64, 3, 3)


# ------------------------------------------------------------------------------------------------
# torchvision ResNet-50 and Caffe2 .pkl into the DK-R50 backbone
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torchvision_r50():
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):  # non-trivial statistics
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _dk_r50(depthwise: bool = False, norm: str = "FrozenBN") -> nn.Module:
    """Detectron2's R50 layout (torchvision's strides) with full DK (groups 1, S 4) in res3-res5."""
    cfg = get_cfg()
    add_dk_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_resnet_dk_backbone"
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False  # torchvision strides in the 3x3
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.DK.ON_PER_STAGE = [False, True, True, True]
    cfg.MODEL.DK.TYPE = "deform_kernel"
    cfg.MODEL.DK.BASE_TYPE = "rigid_conv"  # the rigid convolution (full, as DEPTHWISE is False)
    cfg.MODEL.DK.DEPTHWISE = depthwise
    cfg.MODEL.DK.SCOPE_SIZE = 4
    return build_backbone(cfg, ShapeSpec(channels=3)).eval()


def _torchvision_features(model, images):
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    features = {}
    for index, layer in enumerate([model.layer1, model.layer2, model.layer3, model.layer4]):
        x = layer(x)
        features[f"res{index + 2}"] = x
    return features


def _assert_features_agree(backbone, reference_model):
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _torchvision_features(reference_model, images)
        features = backbone(images)
    for name, value in expected.items():
        error = float((features[name] - value).abs().max() / value.abs().max())
        assert error < 1e-4, f"{name}: relative error {error:.2e}"


def _c2_blobs(model: nn.Module):
    """torchvision ResNet -> Caffe2 blob names (as MSRA's R-50.pkl), BN folded to scale/bias."""

    def batch_norm(prefix, bn):
        # Caffe2 keeps the affine transform only; the model's norm then applies it with running
        # variance 1 and eps 1e-5, hence the sqrt(1 + eps), so that the features can agree.
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) * (1.0 + 1e-5) ** 0.5
        return {
            f"{prefix}_bn_s": scale.detach().numpy(),
            f"{prefix}_bn_b": (bn.bias - bn.running_mean * scale).detach().numpy(),
        }

    blobs = {"conv1_w": model.conv1.weight.detach().numpy(), **batch_norm("res_conv1", model.bn1)}
    for stage, layer in enumerate([model.layer1, model.layer2, model.layer3, model.layer4], 2):
        for index, block in enumerate(layer):
            for branch, conv, bn in (("2a", block.conv1, block.bn1), ("2b", block.conv2, block.bn2),
                                     ("2c", block.conv3, block.bn3)):
                prefix = f"res{stage}_{index}_branch{branch}"
                blobs[f"{prefix}_w"] = conv.weight.detach().numpy()
                blobs.update(batch_norm(prefix, bn))
            if block.downsample is not None:
                prefix = f"res{stage}_{index}_branch1"
                blobs[f"{prefix}_w"] = block.downsample[0].weight.detach().numpy()
                blobs.update(batch_norm(prefix, block.downsample[1]))
    blobs["pred_w"] = model.fc.weight.detach().numpy()
    blobs["pred_b"] = model.fc.bias.detach().numpy()
    return blobs


def test_torchvision_resnet50_loads_into_full_dk_r50(tmp_path, torchvision_r50):
    """Full DK (groups 1) in res3-res5 reproduces torchvision's layer1..layer4 outputs."""
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision_r50.state_dict(), path)
    backbone = _dk_r50(norm="FrozenBN")
    scope = backbone.res3[0].conv2.weight
    assert scope.shape == (128, 128, 4, 4)  # groups 1, S 4: the checkpoint's 3x3 must convert
    DKCheckpointer(backbone).load(str(path))
    torch.testing.assert_close(sample_scope(scope, 3), torchvision_r50.layer2[0].conv2.weight)
    _assert_features_agree(backbone.eval(), torchvision_r50)


def test_caffe2_pkl_loads_into_full_dk_r50(tmp_path, torchvision_r50):
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as file:
        pickle.dump(_c2_blobs(torchvision_r50), file)
    backbone = _dk_r50(norm="BN")  # BatchNorm2d in eval mode: running mean 0, variance 1
    DKCheckpointer(backbone).load(str(path))
    _assert_features_agree(backbone, torchvision_r50)


def test_standard_checkpoint_into_depthwise_dk_r50_raises(tmp_path, torchvision_r50):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision_r50.state_dict(), path)
    backbone = _dk_r50(depthwise=True)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(CheckpointShapeError) as error:
        DKCheckpointer(backbone).load(str(path))
    message = str(error.value)
    assert "res3.0.conv2.weight" in message and "[128, 128, 3, 3]" in message
    assert "[128, 1, 4, 4]" in message and "MODEL.DK.DEPTHWISE False" in message
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, before[name]), name
