"""torchvision's ResNet-50 and a Caffe2 .pkl converted into the full DK-R50 backbone, end to end."""
import pickle

import pytest
import torch
import torchvision
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from torch import nn

from dk_detectron2 import add_dk_config
from dk_detectron2.checkpoint import CheckpointShapeError, DKCheckpointer, sample_scope


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
