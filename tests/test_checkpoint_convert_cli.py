"""The checkpoint conversion command line, ``python -m dk_detectron2.checkpoint``."""
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch

from dk_detectron2.checkpoint import sample_scope
from dk_detectron2.checkpoint.__main__ import main as convert_main


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


def test_cli_leaves_the_previous_output_when_the_save_fails(tmp_path, monkeypatch):
    """A save that dies half-way (disk full, a kill) must not leave a truncated checkpoint where
    a good one was: the output is written atomically."""
    source, target = tmp_path / "resnet.pth", tmp_path / "resnet_dk.pth"
    torch.save(_small_torchvision_state_dict(), source)
    target.write_bytes(b"the previous good checkpoint")
    save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as handle:
                handle.write(b"half a checkpoint")
        else:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert_main(["--input", str(source), "--output", str(target), "--scope-size", "4"])
    monkeypatch.setattr(torch, "save", save)
    assert target.read_bytes() == b"the previous good checkpoint"
    assert sorted(os.listdir(tmp_path)) == ["resnet.pth", "resnet_dk.pth"]


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
