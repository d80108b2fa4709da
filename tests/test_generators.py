"""Generator kinds (MODEL.DK.GENERATOR) and the generator warm-up (MODEL.DK.GENERATOR_WARMUP_ITERS)."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.engine import SimpleTrainer, hooks
from detectron2.solver import build_lr_scheduler
from torch import nn

from dk_detectron2 import add_dk_config
from dk_detectron2.engine import DKTrainer, GeneratorWarmup
from dk_detectron2.layers import DeformKernel2d, DeformKernelConv2d, GlobalDeformKernel2d
from dk_detectron2.layers.generators import GENERATOR_KINDS, build_generator
from dk_detectron2.layers.reference import deform_kernel2d_reference
from dk_detectron2.layers.registry import DKOptions, build_dk_conv
from dk_detectron2.solver import GENERATOR_GROUP_KEY, build_dk_optimizer, generator_parameter_names

GEOMETRY = ((3, 3), (2, 2), (1, 1), (1, 1))  # kernel, stride, padding, dilation


@pytest.mark.parametrize("kind", GENERATOR_KINDS)
def test_generator_has_the_layers_geometry_and_a_zero_output(kind):
    gen = build_generator(kind, 16, 18, *GEOMETRY)
    x = torch.randn(2, 16, 11, 9)
    out = gen(x)
    rigid = F.conv2d(x, torch.zeros(18, 16, 3, 3), None, 2, 1, 1)
    assert out.shape == rigid.shape == (2, 18, 6, 5)
    assert torch.count_nonzero(out) == 0
    out.square().add(out).sum().backward()  # a loss whose gradient at a zero output is non-zero
    last = gen if kind == "full" else gen[1]
    assert last.weight.grad.abs().sum() > 0, "the zero-initialised layer must get gradient"


def test_separable_generator_is_about_a_sixth_of_the_full_one():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    full = count(build_generator("full", 256, 18, *GEOMETRY))
    separable = count(build_generator("separable", 256, 18, *GEOMETRY))
    assert full == 256 * 9 * 18 + 18
    assert separable == 256 * 9 + 256 * 18 + 18
    assert 5 < full / separable < 7


def test_unknown_generator_kind_names_the_choices():
    with pytest.raises(ValueError, match=r"generator must be one of \('full', 'separable'\), got 'tiny'"):
        build_generator("tiny", 4, 18, *GEOMETRY)
    with pytest.raises(ValueError, match="generator must be one of"):
        DeformKernel2d(4, 4, 3, padding=1, groups=4, generator="tiny")
    with pytest.raises(ValueError, match="linear layer: generator must be 'full'"):
        GlobalDeformKernel2d(4, 4, 3, padding=1, groups=4, generator="separable")


@pytest.mark.parametrize("cls", [DeformKernel2d, DeformKernelConv2d])
def test_separable_module_starts_rigid_and_samples_what_its_generator_predicts(cls):
    torch.manual_seed(0)
    m = cls(8, 8, 3, stride=1, padding=1, groups=8, scope_size=5, generator="separable")
    assert "generator='separable'" in repr(m)
    assert isinstance(m.rotation_conv, nn.Sequential)
    x = torch.randn(2, 8, 7, 7)
    torch.testing.assert_close(m(x), F.conv2d(x, m.rigid_weight(), None, 1, 1, 1, 8))
    if cls is DeformKernel2d:
        nn.init.normal_(m.rotation_conv[1].weight, std=0.1)
        rotation = m.rotation_clip(m.rotation_conv(x).view(2, 1, 18, 7, 7), tap_dim=2).view(2, 18, 7, 7)
        expected = deform_kernel2d_reference(x, rotation, m.weight, (3, 3), (1, 1), (1, 1), (1, 1), 1)
        torch.testing.assert_close(m(x), expected, rtol=1e-4, atol=1e-5)


def test_config_key_reaches_the_backbone_layers():
    cfg = add_dk_config(get_cfg())
    assert cfg.MODEL.DK.GENERATOR == "full" and cfg.MODEL.DK.GENERATOR_WARMUP_ITERS == 0
    cfg.MODEL.DK.GENERATOR = "separable"
    options = DKOptions.from_config(cfg)
    assert options.generator == "separable"
    layer = build_dk_conv("deform_kernel", 8, 8, 3, padding=1, groups=8, options=options)
    assert isinstance(layer.rotation_conv, nn.Sequential)
    # every separable generator parameter is a generator parameter (the lr factor reaches it)
    assert generator_parameter_names(layer) == {
        "rotation_conv.0.weight", "rotation_conv.1.weight", "rotation_conv.1.bias"}


class Net(nn.Module):
    """A stem, a DK layer and a loss: enough for SimpleTrainer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dk = DeformKernel2d(8, 8, 3, padding=1, groups=8, scope_size=5, rotation_clip="scope")

    def forward(self, batch):
        x, target = batch
        return {"loss": (self.dk(self.stem(x)) - target).square().mean()}


def _cfg(factor):
    cfg = add_dk_config(get_cfg())
    cfg.MODEL.DK.GENERATOR_LR_FACTOR = factor
    cfg.SOLVER.BASE_LR = 0.1
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.MAX_ITER = 8
    cfg.SOLVER.STEPS = ()
    return cfg


@pytest.mark.parametrize("factor", [1.0, 0.1])
def test_generator_parameters_sit_in_groups_of_their_own(factor):
    model = Net()
    optimizer = build_dk_optimizer(_cfg(factor), model)
    names = {id(p): n for n, p in model.named_parameters()}
    generators = generator_parameter_names(model)
    for group in optimizer.param_groups:
        in_group = {names[id(p)] for p in group["params"]}
        if group.get(GENERATOR_GROUP_KEY):
            assert in_group <= generators
        else:
            assert not in_group & generators
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def _train(warmup_iters, iterations=6):
    torch.manual_seed(0)
    model = Net()
    cfg = _cfg(0.1)
    optimizer = build_dk_optimizer(cfg, model)
    torch.manual_seed(1)
    batches = [(torch.randn(2, 3, 8, 8), torch.randn(2, 8, 8, 8)) for _ in range(iterations)]
    trainer = SimpleTrainer(model, iter(batches), optimizer)
    snapshots = []

    class Snapshot(hooks.HookBase):
        def after_step(self):
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})

    hook_list = [hooks.LRScheduler(optimizer, build_lr_scheduler(cfg, optimizer)), Snapshot()]
    if warmup_iters:
        hook_list.insert(0, GeneratorWarmup(warmup_iters))
    trainer.register_hooks(hook_list)
    trainer.train(0, iterations)
    return model, snapshots


def test_warmup_holds_the_generators_then_lets_them_learn_at_the_scheduled_rate():
    model, snaps = _train(warmup_iters=3)
    initial = torch.zeros_like(model.dk.rotation_conv.weight)
    for it in range(3):  # iterations 0, 1, 2: generators frozen at zero, the rest learns
        assert torch.equal(snaps[it]["dk.rotation_conv.weight"], initial), it
    assert not torch.equal(snaps[0]["stem.weight"], snaps[1]["stem.weight"])
    assert not torch.equal(snaps[3]["dk.rotation_conv.weight"], initial)
    assert not torch.equal(snaps[5]["dk.rotation_conv.weight"], snaps[4]["dk.rotation_conv.weight"])
    _, plain = _train(warmup_iters=0)
    assert not torch.equal(plain[0]["dk.rotation_conv.weight"], initial)


def test_warmup_is_added_by_the_trainer_only_when_asked_and_validated():
    with pytest.raises(ValueError, match="warmup_iters must be an int >= 0, got -1"):
        GeneratorWarmup(-1)
    with pytest.raises(TypeError, match="warmup_iters must be an int >= 0, got True"):
        GeneratorWarmup(True)
    trainer = DKTrainer.__new__(DKTrainer)  # only build_hooks' decision is under test
    cfg = _cfg(0.1)
    cfg.MODEL.DK.GENERATOR_WARMUP_ITERS = 5
    trainer.cfg = cfg

    class Checkpointer:
        model = Net()

    trainer.checkpointer = Checkpointer()
    import detectron2.engine.defaults as defaults

    original = defaults.DefaultTrainer.build_hooks
    defaults.DefaultTrainer.build_hooks = lambda self: []  # a fresh list per call
    try:
        hooks_with = DKTrainer.build_hooks(trainer)
        cfg.MODEL.DK.GENERATOR_WARMUP_ITERS = 0
        hooks_without = DKTrainer.build_hooks(trainer)
    finally:
        defaults.DefaultTrainer.build_hooks = original
    assert isinstance(hooks_with[0], GeneratorWarmup) and hooks_with[0].warmup_iters == 5
    assert not any(isinstance(h, GeneratorWarmup) for h in hooks_without)
