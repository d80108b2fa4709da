"""add_dk_config and the base config file."""

import inspect
import os
import re

from detectron2.config import CfgNode, get_cfg

from dk_detectron2 import add_dk_config
from dk_detectron2.config import add_dk_config as add_dk_config_module
from dk_detectron2.layers import DKOptions
from dk_detectron2.layers.registry import dk_conv_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = {
    "ON_PER_STAGE": [False, True, True, True],
    "TYPE": "deform_kernel",
    "BASE_TYPE": "rigid_conv",
    "DEPTHWISE": True,
    "SCOPE_SIZE": 5,
    "ROTATION_GROUPS": 1,
    "ROTATION_CLIP": "scope",
    "ROTATION_CLIP_RANGE": [-1.0, 1.0],
    "GENERATOR_LR_FACTOR": 0.01,
    "GENERATOR": "full",
    "GENERATOR_WARMUP_ITERS": 0,
    "NUM_EXPERTS": 4,
    "SCOPE_INIT": "full",
}


def test_defaults():
    cfg = add_dk_config(get_cfg())
    assert add_dk_config is add_dk_config_module
    assert isinstance(cfg.MODEL.DK, CfgNode)
    assert dict(cfg.MODEL.DK) == DEFAULTS
    assert cfg.MODEL.DK.TYPE in dk_conv_names() and cfg.MODEL.DK.BASE_TYPE in dk_conv_names()


def test_every_key_has_a_comment():
    lines = inspect.getsource(add_dk_config).splitlines()
    for index, line in enumerate(lines):
        match = re.match(r"\s*_C\.MODEL\.DK\.(\w+) = ", line)
        if match:
            assert lines[index - 1].strip().startswith("#"), match.group(1)
    assert sum(bool(re.match(r"\s*_C\.MODEL\.DK\.\w+ = ", line)) for line in lines) == len(DEFAULTS)


def test_options_from_config():
    cfg = add_dk_config(get_cfg())
    cfg.MODEL.DK.SCOPE_SIZE = 5
    cfg.MODEL.DK.ROTATION_CLIP_RANGE = [-2.0, 0.5]
    options = DKOptions.from_config(cfg)
    assert options == DKOptions(scope_size=5, rotation_clip_range=(-2.0, 0.5))


def test_base_config_merges_and_round_trips(tmp_path):
    cfg = add_dk_config(get_cfg())
    cfg.merge_from_file(os.path.join(ROOT, "configs", "Base-DK-RCNN-FPN.yaml"))
    assert cfg.MODEL.BACKBONE.NAME == "build_resnet_dk_fpn_backbone"
    assert dict(cfg.MODEL.DK) == DEFAULTS
    path = tmp_path / "dumped.yaml"
    path.write_text(cfg.dump())
    again = add_dk_config(get_cfg())
    again.merge_from_file(str(path))
    assert again.MODEL.DK == cfg.MODEL.DK  # (tuples elsewhere come back as lists)
    assert again.MODEL.BACKBONE.NAME == cfg.MODEL.BACKBONE.NAME


def test_command_line_style_overrides():
    cfg = add_dk_config(get_cfg())
    cfg.merge_from_list(
        ["MODEL.DK.TYPE", "cond_conv", "MODEL.DK.ON_PER_STAGE", "[True, True, False, False]"]
    )
    assert cfg.MODEL.DK.TYPE == "cond_conv"
    assert cfg.MODEL.DK.ON_PER_STAGE == [True, True, False, False]
