"""The classification models in timm's registry (``dk_detectron2.classification``): every name
builds, runs forward and backward; timm's facilities work on them (``features_only``,
``resolve_data_config``, ``pretrained_cfg``, ``load_checkpoint``, ``pretrained=True`` from a local
file); a rigid checkpoint loaded into the DK twin computes exactly the rigid model; bad input gets
errors naming it. CPU, 64 x 64 inputs.
"""
import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config
from timm.models import load_checkpoint

import dk_detectron2  # noqa: F401  (registers the models)
from dk_detectron2.checkpoint import CheckpointShapeError
from dk_detectron2.classification import MODEL_NAMES, checkpoint_filter_fn, generator_parameters

from _classification_checkpoints import save_timm_checkpoint, trained_like

SIZE = 64
# rigid checkpoint -> its DK twins (timm's own mobilenetv2_050 for the MobileNet)
TWINS = {
    "resnet50_dw": ("dk_resnet50_dw",),
    "resnet18_dw_050": ("dk_resnet18_dw_050", "dkdcn_resnet18_dw_050"),
    "mobilenetv2_050": ("dk_mobilenetv2_050",),
    "mobilenetv2_075": ("dk_mobilenetv2_075",),
}
RIGID = ("resnet50_dw", "resnet18_dw", "resnet18_dw_050", "mobilenetv2_050", "mobilenetv2_075")


def an_input(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def create(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, **kwargs)


def assert_same(actual: torch.Tensor, expected: torch.Tensor):
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_creates_runs_forward_and_backward(name):
    model = create(name, num_classes=5)
    logits = model(an_input(batch=1))
    assert logits.shape == (1, 5) and torch.isfinite(logits).all()
    logits.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_features_only_matches_feature_info(name):
    model = create(name, features_only=True).eval()
    with torch.no_grad():
        features = model(an_input(batch=1))
    info = model.feature_info
    assert len(features) == len(info.channels()) >= 4
    for feature, channels, reduction in zip(features, info.channels(), info.reduction()):
        assert feature.shape == (1, channels, SIZE // reduction, SIZE // reduction)
    if "resnet" in name:
        assert info.module_name() == ["res2", "res3", "res4", "res5"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_pretrained_cfg_and_data_config(name):
    model = create(name, num_classes=3)
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == name and not cfg["url"]  # nothing to download
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    assert isinstance(model.get_submodule(cfg["classifier"]), torch.nn.Linear)
    data = resolve_data_config({}, model=model)
    assert data["mean"] == IMAGENET_DEFAULT_MEAN and data["std"] == IMAGENET_DEFAULT_STD
    assert data["input_size"] == (3, 224, 224)
    assert resolve_data_config({"input_size": (3, SIZE, SIZE)}, model=model)["input_size"] == (
        3, SIZE, SIZE
    )


def test_generator_parameters_of_dk_models_and_none_of_rigid_ones():
    for name in MODEL_NAMES + RIGID:
        model = create(name)
        generators = generator_parameters(model)
        if name in RIGID:
            assert generators == [], name
            continue
        assert generators, name
        names = {id(p): n for n, p in model.named_parameters()}
        assert all(("rotation_conv" in names[id(p)] or "offset_conv" in names[id(p)])
                   for p in generators), name


@pytest.mark.parametrize("rigid,dk", [(r, d) for r, ds in TWINS.items() for d in ds])
def test_rigid_checkpoint_loads_into_the_dk_twin_which_computes_the_rigid_model(
    rigid, dk, tmp_path
):
    rigid_model = trained_like(create(rigid, num_classes=7)).eval()
    path = str(tmp_path / f"{rigid}.pth")
    torch.save(rigid_model.state_dict(), path)
    x = an_input()
    with torch.no_grad():
        expected = rigid_model(x)
    dk_model = create(dk, seed=1, num_classes=7)
    load_checkpoint(dk_model, path, filter_fn=checkpoint_filter_fn)
    with torch.no_grad():
        assert_same(dk_model.eval()(x), expected)
    # The same through pretrained=True from the local file (its 7 classes said in the overlay).
    overlay = dict(file=path, num_classes=7)
    pretrained = create(dk, seed=2, num_classes=7, pretrained=True, pretrained_cfg_overlay=overlay)
    with torch.no_grad():
        assert_same(pretrained.eval()(x), expected)


def test_pretrained_file_in_timms_training_format_with_a_new_classifier(tmp_path):
    trained = trained_like(create("dk_resnet18_dw_050", num_classes=7)).eval()
    path = save_timm_checkpoint(trained, tmp_path, arch="dk_resnet18_dw_050")
    overlay = dict(file=path)  # pretrained_cfg's num_classes (1000) is not 3: a new classifier
    model = create("dk_resnet18_dw_050", seed=3, num_classes=3, pretrained=True,
                   pretrained_cfg_overlay=overlay).eval()
    x = an_input()
    with torch.no_grad():
        assert_same(model.forward_features(x), trained.forward_features(x))
        assert model(x).shape == (2, 3)
    # load_checkpoint reads timm's training format too (the model weights, or the EMA's).
    again = create("dk_resnet18_dw_050", seed=4, num_classes=7)
    load_checkpoint(again, path, filter_fn=checkpoint_filter_fn)
    with torch.no_grad():
        assert_same(again.eval()(x), trained(x))
    load_checkpoint(again, path, use_ema=True, filter_fn=checkpoint_filter_fn)


def test_unknown_model_name_is_named():
    with pytest.raises(RuntimeError, match="dk_resnet51_dw"):
        timm.create_model("dk_resnet51_dw")


def test_checkpoint_of_another_model_raises_naming_the_layer(tmp_path):
    path = str(tmp_path / "resnet18_dw.pth")
    torch.save(create("resnet18_dw").state_dict(), path)
    expected = r"res3\.0\.shortcut\.weight.*\[512, 256, 1, 1\]"
    with pytest.raises(CheckpointShapeError, match=expected):
        load_checkpoint(create("dk_resnet50_dw"), path, filter_fn=checkpoint_filter_fn)
    with pytest.raises(CheckpointShapeError, match=r"res3\.0\.shortcut\.weight"):
        create("dk_resnet50_dw", pretrained=True, pretrained_cfg_overlay=dict(file=path))


def test_checkpoint_of_another_scope_size_raises_naming_the_layer(tmp_path):
    path = str(tmp_path / "dk_scope5.pth")
    torch.save(create("dk_resnet18_dw_050").state_dict(), path)
    expected = r"scope size.*res3\.0\.conv1\.depthwise\.weight.*\[32, 1, 5, 5\].*\[32, 1, 7, 7\]"
    with pytest.raises(CheckpointShapeError, match=expected):
        load_checkpoint(create("dk_resnet18_dw_050", scope_size=7), path,
                        filter_fn=checkpoint_filter_fn)
    with pytest.raises(CheckpointShapeError, match=expected):
        create("dk_resnet18_dw_050", scope_size=7, pretrained=True,
               pretrained_cfg_overlay=dict(file=path))


@pytest.mark.parametrize("name", ["resnet50_dw", "dk_resnet18_dw_050"])
def test_forward_intermediates_gives_the_features_only_outputs(name):
    model = create(name).eval()
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    x = an_input(batch=1)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        for options in ({}, {"feature_cls": "getter"}):  # the stages' outputs; this method's
            features = create(name, features_only=True, **options).eval()
            features.load_state_dict(body, strict=False)
            for ours, theirs in zip(intermediates[1:], features(x)):
                torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [t.shape[1] for t in last_two] == [i["num_chs"] for i in model.feature_info[-2:]]


def test_mobilenet_rigid_control_with_a_larger_kernel():
    """``kernel_size=5`` makes the depthwise convs of ``dk_stages`` K x K (the rigid control with a
    5 x 5 scope's support); the other stages and every feature map keep their shapes."""
    three = create("dk_mobilenetv2_050", dk_type="rigid_conv").eval()
    five = create("dk_mobilenetv2_050", dk_type="rigid_conv", kernel_size=5).eval()
    for stage, (blocks3, blocks5) in enumerate(zip(three.blocks, five.blocks)):
        for block3, block5 in zip(blocks3, blocks5):
            weight3 = next(block3.conv_dw.parameters())
            weight5 = next(block5.conv_dw.parameters())
            expected = (5, 5) if stage in five.dk_stages else (3, 3)
            assert tuple(weight5.shape[-2:]) == expected, (stage, weight5.shape)
            assert weight5.shape[:2] == weight3.shape[:2]
    x = an_input(batch=1)
    with torch.no_grad():
        features3 = three.forward_intermediates(x, intermediates_only=True)
        features5 = five.forward_intermediates(x, intermediates_only=True)
    assert [f.shape for f in features5] == [f.shape for f in features3]
    params3 = sum(p.numel() for p in three.parameters())
    params5 = sum(p.numel() for p in five.parameters())
    assert params5 > params3


def test_mobilenet_width_075_rigid_is_dk_050s_budget_control():
    """The rigid MobileNet-V2 at width 0.75 spends what DK costs at width 0.5: parameters and
    multiply-adds per 64 px image within 5 % of DK's (the study's budget-matched control)."""
    from dk_detectron2.tools.flops import image_model_macs

    dk = create("dk_mobilenetv2_050", num_classes=6).eval()
    wide = create("dk_mobilenetv2_075", num_classes=6, dk_type="rigid_conv").eval()
    assert not generator_parameters(wide)
    params = [sum(p.numel() for p in m.parameters()) for m in (dk, wide)]
    macs = [image_model_macs(m, (3, SIZE, SIZE)) for m in (dk, wide)]
    assert abs(params[1] / params[0] - 1) < 0.05, params
    assert abs(macs[1] / macs[0] - 1) < 0.05, macs


@pytest.mark.parametrize("kernel_size", [4, 0, 2.0, True])
def test_mobilenet_kernel_size_must_be_odd(kernel_size):
    with pytest.raises(ValueError, match=r"kernel_size must be an odd positive int, got"):
        create("dk_mobilenetv2_050", dk_type="rigid_conv", kernel_size=kernel_size)


def _replaced_depthwise_weights(model):
    """The weights of the depthwise convs that ``dk_stages`` replaced, with their channel counts."""
    return [(block.conv_dw.weight.detach(), block.conv_dw.out_channels)
            for stage in model.dk_stages for block in model.blocks[stage]]


def _std_over_expected(weights, expected_std):
    """Std of each weight over its expected std, pooled (sum of squares) over the layers."""
    squares = sum(float((w / expected_std(c)).square().sum()) for w, c in weights)
    return (squares / sum(w.numel() for w, _ in weights)) ** 0.5


def test_mobilenet_depthwise_init_msra_starts_the_rigid_conv_at_dks_scale():
    """``depthwise_init="msra"`` (the default) gives the rigid conv DK's zero-rotation std
    sqrt(2 / (C K^2)); ``"rigid_pytorch"`` keeps PyTorch's init for the rigid conv (uniform, std
    1 / (K sqrt 3)) and changes nothing else: DK's init and every unreplaced layer are the same."""
    rigid = create("dk_mobilenetv2_050", dk_type="rigid_conv")
    rigid_pytorch = create("dk_mobilenetv2_050", dk_type="rigid_conv", depthwise_init="rigid_pytorch")
    dk = create("dk_mobilenetv2_050")
    dk_pytorch = create("dk_mobilenetv2_050", depthwise_init="rigid_pytorch")
    assert (rigid.depthwise_init, rigid_pytorch.depthwise_init) == ("msra", "rigid_pytorch")

    def he_std(channels):
        return (2.0 / (channels * 9)) ** 0.5

    def pytorch_std(channels):
        return 1.0 / (3 * 3**0.5)

    assert _std_over_expected(_replaced_depthwise_weights(rigid), he_std) == pytest.approx(1, abs=0.05)
    assert _std_over_expected(_replaced_depthwise_weights(rigid_pytorch), pytorch_std) == \
        pytest.approx(1, abs=0.05)
    # DK's zero-rotation taps read the scope's central 3 x 3 cells (scope 5, K 3).
    dk_taps = [(w[..., 1:4, 1:4], c) for w, c in _replaced_depthwise_weights(dk)]
    assert _std_over_expected(dk_taps, he_std) == pytest.approx(1, abs=0.05)
    for (a, _), (b, _) in zip(_replaced_depthwise_weights(dk), _replaced_depthwise_weights(dk_pytorch)):
        assert torch.equal(a, b)
    replaced = {f"blocks.{s}." for s in rigid.dk_stages}
    for (name, p), (_, q) in zip(rigid.named_parameters(), rigid_pytorch.named_parameters()):
        if not any(name.startswith(prefix) and ".conv_dw." in name for prefix in replaced):
            assert torch.equal(p, q), name


def test_mobilenet_depthwise_init_must_be_known():
    with pytest.raises(ValueError, match=r"depthwise_init must be one of \('msra', 'rigid_pytorch'\), "
                                         r"got 'timm'"):
        create("dk_mobilenetv2_050", depthwise_init="timm")
