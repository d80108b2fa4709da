"""fvcore handles of the DK operators: counts equal hand counts; analyze_model reports a DK model."""

import pytest
import torch
import torchvision
from fvcore.nn import ActivationCountAnalysis, FlopCountAnalysis
from torch import nn

from dk_detectron2.layers import (
    LearntOffsetDeformConv2d,
    deform_kernel2d,
    deform_kernel_conv2d,
    nd_linear_sample,
)
from dk_detectron2.layers.deform_kernel import (
    DeformKernel2d,
    DeformKernelConv2d,
    GlobalDeformKernel2d,
)
from dk_detectron2.tools.flops import (
    add_dk_activation_handles,
    add_dk_flop_handles,
    dk_flop_handles,
    image_model_macs,
)


class _Call(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _count(module, inputs):
    analysis = add_dk_flop_handles(FlopCountAnalysis(module, inputs), torchvision=True)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    counts = analysis.by_operator()
    assert not analysis.unsupported_ops(), analysis.unsupported_ops()
    return counts


def test_handles_are_registered_under_the_traced_op_names():
    ours = {"dk_detectron2::deform_kernel2d", "dk_detectron2::deform_kernel_conv2d",
            "dk_detectron2::nd_linear_sample"}
    assert set(dk_flop_handles()) == ours
    assert set(dk_flop_handles(torchvision=True)) == ours | {"torchvision::deform_conv2d"}


def test_deform_kernel2d_count_equals_the_hand_count():
    # B=2, C=6, 3x3 taps, stride 2, padding 1 on 11x9 -> 6x5 outputs, 2 rotation groups.
    x, weight = torch.randn(2, 6, 11, 9), torch.randn(6, 1, 5, 5)
    rotation = torch.randn(2, 2 * 9 * 2, 6, 5)
    op = _Call(lambda x, r, w: deform_kernel2d(x, r, w, 3, 2, 1, 1, 2))
    counts = _count(op, (x, rotation, weight))
    outputs = 2 * 6 * 6 * 5
    assert counts == {"deform_kernel2d": outputs * 9 * (1 + 4)}  # 1 MAC + 4 bilinear MACs per tap


def test_deform_kernel_conv2d_count_adds_the_image_space_bilinear_reads():
    x, weight = torch.randn(1, 4, 8, 8), torch.randn(4, 1, 4, 4)
    offset, rotation = torch.randn(1, 18, 8, 8), torch.randn(1, 18, 8, 8)
    op = _Call(lambda x, o, r, w: deform_kernel_conv2d(x, o, r, w, 3, 1, 1, 1, 1))
    counts = _count(op, (x, offset, rotation, weight))
    outputs = 4 * 8 * 8
    assert counts == {"deform_kernel_conv2d": outputs * 9 * 5 + outputs * 9 * 4}


class _Value:
    """Stands for a traced ``torch._C.Value``: a complete tensor type, or a constant."""

    def __init__(self, shape=None, constant=None):
        self.shape, self.constant = shape, constant

    def isCompleteTensor(self):
        return self.shape is not None

    def type(self):
        return self

    def sizes(self):
        return list(self.shape)

    def toIValue(self):
        return self.constant


def test_grouped_deform_kernel_counts_every_input_channel_of_the_group():
    # C_in = 4, C_out = 6, groups = 2: weight [6, 2, S, S]; 3x3 taps, 5x5 outputs, G = 3.
    from dk_detectron2.tools.flops import deform_kernel2d_flop_jit, deform_kernel_conv2d_flop_jit

    x, weight, out = _Value((1, 4, 5, 5)), _Value((6, 2, 4, 4)), [_Value((1, 6, 5, 5))]
    offset, rotation = _Value((1, 18, 5, 5)), _Value((1, 3 * 18, 5, 5))
    geometry = [_Value(constant=[3, 3]), _Value(constant=[1, 1])] + [_Value(constant=[1, 1])] * 2
    groups = _Value(constant=3)
    outputs = 6 * 5 * 5
    dk = deform_kernel2d_flop_jit([x, rotation, weight, *geometry, groups], out)
    assert dk == outputs * 9 * 2 * 5
    reads = 4 * 5 * 5 * 9  # image-space bilinear reads: once per input channel, position, tap
    dkc = deform_kernel_conv2d_flop_jit([x, offset, rotation, weight, *geometry, groups], out)
    assert dkc == outputs * 9 * 2 * 5 + reads * 4


def test_handles_read_arguments_by_schema_name_and_reject_a_bool_group_count():
    import pytest

    from dk_detectron2.layers.ops import arguments_by_name
    from dk_detectron2.tools.flops import deform_kernel2d_flop_jit

    op = torch.ops.dk_detectron2.deform_kernel_conv2d.default
    named = arguments_by_name(op, list(range(9)))
    assert named["weight"] == 3 and named["rotation_groups"] == 8  # the schema's order
    with pytest.raises(TypeError, match="op must be an operator overload with a schema"):
        arguments_by_name(torch.nn.functional.conv2d, [])
    with pytest.raises(ValueError, match="takes 9 arguments, got 10 positional"):
        arguments_by_name(op, list(range(10)))
    x, weight, out = _Value((1, 4, 5, 5)), _Value((4, 1, 4, 4)), [_Value((1, 4, 5, 5))]
    geometry = [_Value(constant=[3, 3])] + [_Value(constant=[1, 1])] * 3
    for groups in (True, 0, 1.0):
        with pytest.raises(ValueError, match="rotation_groups is not a constant int"):
            deform_kernel2d_flop_jit([x, _Value((1, 18, 5, 5)), weight, *geometry,
                                      _Value(constant=groups)], out)


def test_nd_linear_sample_count_is_four_macs_per_sample():
    counts = _count(_Call(nd_linear_sample), (torch.randn(7, 4, 4), torch.rand(9, 2) * 3))
    assert counts == {"nd_linear_sample": 9 * 7 * 4}


def test_torchvision_deform_conv2d_count_with_and_without_mask():
    x, weight = torch.randn(1, 4, 8, 8), torch.randn(6, 2, 3, 3)  # 2 weight groups
    offset, mask = torch.randn(1, 18, 4, 4), torch.rand(1, 9, 4, 4)
    conv = 6 * 4 * 4 * 9 * 2
    reads = 4 * 4 * 4 * 9
    plain = _Call(lambda x, o: torchvision.ops.deform_conv2d(x, o, weight, stride=2, padding=1))
    assert _count(plain, (x, offset)) == {"deform_conv2d": conv + reads * 4}
    masked = _Call(
        lambda x, o, m: torchvision.ops.deform_conv2d(x, o, weight, stride=2, padding=1, mask=m)
    )
    assert _count(masked, (x, offset, mask)) == {"deform_conv2d": conv + reads * 5}


def test_dk_modules_count_generator_convolution_plus_op():
    x = torch.randn(1, 8, 10, 10)
    dk = DeformKernel2d(8, 8, 3, stride=1, padding=1, groups=8, scope_size=4).eval()
    counts = _count(dk, (x,))
    positions = 10 * 10
    assert counts["conv"] == positions * 18 * 8 * 9  # rotation_conv: 8 -> 18 channels, 3x3
    assert counts["deform_kernel2d"] == positions * 8 * 9 * 5

    dkc = DeformKernelConv2d(8, 8, 3, stride=1, padding=1, groups=8, scope_size=4).eval()
    counts = _count(dkc, (x,))
    assert counts["conv"] == 2 * positions * 18 * 8 * 9  # offset_conv + rotation_conv
    assert counts["deform_kernel_conv2d"] == positions * 8 * 9 * (5 + 4)

    gdk = GlobalDeformKernel2d(8, 8, 3, stride=1, padding=1, groups=8, scope_size=4).eval()
    analysis = add_dk_flop_handles(FlopCountAnalysis(gdk, (x,)))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    counts = analysis.by_operator()
    assert counts["nd_linear_sample"] == 9 * 8 * 4  # one kernel sampled per image
    assert counts["conv"] == positions * 8 * 9  # the per-sample depthwise convolution


def test_deform_conv_module_counts_as_deformable_convolution_on_the_cpu():
    """The CPU forward runs the DK operator, but a trace (the FLOP count) records torchvision's:
    the count is deformable convolution's, the same on every device."""
    x = torch.randn(1, 8, 10, 10)
    dcn = LearntOffsetDeformConv2d(8, 8, 3, padding=1, groups=8).eval()
    counts = _count(dcn, (x,))
    positions = 10 * 10
    assert counts == {
        "conv": positions * 18 * 8 * 9,  # offset_conv: 8 -> 18 channels, 3x3
        "deform_conv2d": positions * 8 * 9 * 1 + positions * 8 * 9 * 4,  # taps + bilinear reads
    }


def test_image_model_macs_counts_one_image_and_leaves_the_model_as_it_was():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
        DeformKernel2d(8, 8, 3, stride=1, padding=1, groups=8, scope_size=4),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    model.train()
    running_mean = model[1].running_mean.clone()
    positions = 10 * 10
    expected = (positions * 8 * 3 * 9  # stem conv
                + 2 * positions * 8  # eval-mode batch norm (fvcore: two per element)
                + positions * 18 * 8 * 9  # DK rotation generator
                + positions * 8 * 9 * 5  # DK op: tap product + kernel-space bilinear read
                + positions * 8  # average pooling
                + 8 * 5)  # classifier
    assert image_model_macs(model, (3, 10, 10)) == expected
    assert model.training and torch.equal(model[1].running_mean, running_mean)
    assert model[1].num_batches_tracked.item() == 0
    for bad in ((3, 10), (3, 0, 10), (3.5, 10, 10)):
        with pytest.raises(ValueError, match="input_size must be"):
            image_model_macs(model, bad)


def test_activation_handles_count_output_elements():
    x = torch.randn(2, 8, 10, 10)
    dk = DeformKernel2d(8, 8, 3, stride=2, padding=1, groups=8, scope_size=4).eval()
    analysis = add_dk_activation_handles(ActivationCountAnalysis(dk, (x,)))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    assert analysis.by_operator()["deform_kernel2d"] == 2 * 8 * 5 * 5


def test_analyze_model_counts_every_dk_layer_of_a_dk_mask_rcnn(tmp_path):
    from _tools_configs import tiny_dk_config

    from dk_detectron2.tools.analyze_model import count_flops, main
    from dk_detectron2.tools.loaders import load_model, setup_cfg

    config = tiny_dk_config(tmp_path)
    model = load_model(setup_cfg(config, device="cpu"))
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    hand = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: hand.append(o.numel() * 9 * 5))
        for m in model.modules()
        if isinstance(m, DeformKernel2d)
    ]
    assert hooks, "the tiny DK config has no DeformKernel2d layer"
    with torch.no_grad():
        model([{"image": image}])
    for hook in hooks:
        hook.remove()
    flops = count_flops(model, [[{"image": image}]])
    assert flops["by_operator"]["deform_kernel2d"] == sum(hand)
    assert flops["total"][0] > flops["by_operator"]["deform_kernel2d"] > 0
    assert "backbone.bottom_up.res3" in flops["table"]  # fvcore's per-module table

    report = main(["--config-file", config, "--synthetic", "--tasks", "parameter", "structure"])
    assert "backbone.bottom_up.res3" in report["parameter"]
    assert "DeformKernel2d" in report["structure"]


# ------------------------------------------------------------------------------------------------
# Defaults: after `import dk_detectron2`, no handle has to be added by hand
# ------------------------------------------------------------------------------------------------
def _unsupported_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "nsupported operator" in r.getMessage()]


def test_fvcore_analysis_counts_dk_ops_with_its_default_handles(caplog):
    x = torch.randn(1, 8, 10, 10)
    dkc = DeformKernelConv2d(8, 8, 3, stride=1, padding=1, groups=8, scope_size=4).eval()
    with caplog.at_level("WARNING"):
        analysis = FlopCountAnalysis(dkc, (x,))  # no add_dk_flop_handles
        counts = analysis.by_operator()
    assert not any("dk_detectron2" in m for m in _unsupported_warnings(caplog))
    assert not analysis.unsupported_ops()
    assert counts["deform_kernel_conv2d"] == 10 * 10 * 8 * 9 * (5 + 4)
    activations = ActivationCountAnalysis(dkc, (x,)).by_operator()
    assert activations["deform_kernel_conv2d"] == 8 * 10 * 10


def test_detectron2_analysis_of_a_dk_mask_rcnn_counts_dk_ops_without_warnings(tmp_path, caplog):
    from _tools_configs import tiny_dk_config
    from detectron2.utils.analysis import FlopCountAnalysis as D2FlopCountAnalysis

    from dk_detectron2.tools.loaders import load_model, setup_cfg

    model = load_model(setup_cfg(tiny_dk_config(tmp_path), device="cpu"))
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    hand = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: hand.append(o.numel() * 9 * 5))
        for m in model.modules()
        if isinstance(m, DeformKernel2d)
    ]
    with torch.no_grad():
        model([{"image": image}])
    for hook in hooks:
        hook.remove()
    with caplog.at_level("WARNING"):
        analysis = D2FlopCountAnalysis(model, [{"image": image}])
        counts = analysis.by_operator()
    assert not any("dk_detectron2" in m for m in _unsupported_warnings(caplog))
    assert not any(op.startswith("dk_detectron2") for op in analysis.unsupported_ops())
    assert counts["deform_kernel2d"] == sum(hand) > 0


def test_plain_import_registers_the_handles_in_a_fresh_interpreter():
    import subprocess
    import sys

    code = (
        "import dk_detectron2, torch\n"
        "from fvcore.nn import FlopCountAnalysis\n"
        "from dk_detectron2.layers import DeformKernel2d\n"
        "m = DeformKernel2d(4, 4, 3, padding=1, groups=4, scope_size=5).eval()\n"
        "a = FlopCountAnalysis(m, (torch.randn(1, 4, 6, 6),))\n"
        "print(a.by_operator()['deform_kernel2d'], sorted(a.unsupported_ops()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == f"{4 * 6 * 6 * 9 * 5} []"
    assert "Unsupported operator" not in result.stderr


def _unsupported_ops(model, image, caplog):
    """fvcore's unsupported operators of a detector, from its log and from the analysis."""
    from detectron2.utils.analysis import FlopCountAnalysis as D2FlopCountAnalysis

    caplog.clear()
    with caplog.at_level("WARNING"):
        analysis = D2FlopCountAnalysis(model, [{"image": image}])
        analysis.total()
    logged = {m.split("Unsupported operator ")[1].split(" ")[0]
              for m in _unsupported_warnings(caplog)}
    assert logged == set(analysis.unsupported_ops())  # the log says what the analysis skipped
    return logged


def test_dk_mask_rcnns_have_no_unsupported_operator_a_rigid_one_lacks(tmp_path, caplog):
    """The clip of rotation_clip="scope" (the configs' default) and the per-sample pooling of
    global DK and CondConv use ops fvcore ignores or counts: no warning beyond the rigid baseline's (Detectron2's own topk,
    roi_align, pad, ...)."""
    from _tools_configs import tiny_dk_config

    from dk_detectron2.tools.loaders import load_model, setup_cfg

    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    rigid_cfg = setup_cfg(tiny_dk_config(tmp_path, "rigid_conv"), device="cpu")
    rigid = _unsupported_ops(load_model(rigid_cfg).eval(), image, caplog)
    assert rigid, "the rigid baseline should show Detectron2's own unsupported operators"
    for dk_type in ("deform_kernel", "deform_kernel_conv", "global_deform_kernel", "cond_conv"):
        cfg = setup_cfg(tiny_dk_config(tmp_path, dk_type), device="cpu")
        assert cfg.MODEL.DK.ROTATION_CLIP == "scope"
        found = _unsupported_ops(load_model(cfg).eval(), image, caplog)
        assert found <= rigid, (dk_type, sorted(found - rigid))


def test_rotation_clip_and_global_pooling_trace_to_ops_fvcore_handles():
    from fvcore.nn.jit_analysis import _IGNORED_OPS

    x = torch.randn(1, 8, 10, 10)
    for module in (DeformKernel2d(8, 8, 3, padding=1, groups=8, scope_size=5,
                                  rotation_clip="scope"),
                   GlobalDeformKernel2d(8, 8, 3, padding=1, groups=8, scope_size=5,
                                        rotation_clip="range")):
        analysis = FlopCountAnalysis(module.eval(), (x,))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        analysis.total()
        # (plain fvcore also lists elementwise adds and multiplies; Detectron2's ignores them)
        skipped = set(analysis.unsupported_ops())
        assert not skipped & {"aten::minimum", "aten::maximum", "aten::mean"}, skipped
    assert "aten::clamp" in _IGNORED_OPS
    assert "adaptive_avg_pool2d" in analysis.by_operator()  # global DK's pooling is counted


_TORCHVISION_DCN_FLOPS = """
import sys, torch, torchvision
from fvcore.nn import FlopCountAnalysis
torch.manual_seed(0)
dcn, x = torchvision.ops.DeformConv2d(4, 4, 3, padding=1).eval(), torch.randn(1, 4, 6, 6)
offset = torch.zeros(1, 18, 6, 6)
def total():
    analysis = FlopCountAnalysis(dcn, (x, offset))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis.total()
before = total()
import dk_detectron2
after_import = total()
from dk_detectron2.tools.flops import register_default_handles
register_default_handles(torchvision=True)
print(before, after_import, total())
"""


def test_importing_the_package_leaves_torchvision_deform_conv2d_counts_alone():
    """``import dk_detectron2`` registers the handles of its own operators only: an unrelated
    model with torchvision's DeformConv2d counts the same before and after; the torchvision
    handle comes with an explicit ``register_default_handles(torchvision=True)``."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _TORCHVISION_DCN_FLOPS], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    before, after_import, registered = map(int, result.stdout.split())
    assert after_import == before
    conv, reads = 36 * 4 * 9 * 4, 36 * 4 * 9  # B C_out Ho Wo taps C_in, B C_in Ho Wo taps
    assert registered == conv + reads * 4
