"""demo.py: a tiny random-init DK Mask R-CNN draws its predictions on generated images."""

import os
import runpy
import sys

import numpy as np
import pytest
from PIL import Image

from dk_detectron2.tools.demo import expand_inputs, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(folder, count=2, size=(72, 64)):
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)
        pixels[20:40, 16:48] = (255, 40, 40)  # a red block
        path = os.path.join(folder, f"image_{i}.png")
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def test_demo_writes_one_drawn_png_per_input_image_and_a_montage(tmp_path):
    from _tools_configs import tiny_dk_config

    inputs = _images(str(tmp_path / "in"))
    config = tiny_dk_config(tmp_path)
    out, montage = tmp_path / "out", tmp_path / "montage.png"
    args = ["--config-file", config, "--input", str(tmp_path / "in"), "--output", str(out)]
    args += ["--confidence-threshold", "0.0", "--montage", str(montage)]
    written = main(args + ["--opts", "MODEL.WEIGHTS", ""])
    assert sorted(os.path.basename(p) for p in written) == ["image_0.png", "image_1.png"]
    for path, source in zip(sorted(written), inputs):
        drawn = np.asarray(Image.open(path))
        assert drawn.shape == (72, 64, 3)
        assert not np.array_equal(drawn, np.asarray(Image.open(source)))  # something was drawn
    assert np.asarray(Image.open(montage)).shape == (72, 64 * 2 + 4, 3)


def test_demo_single_input_to_a_file_and_glob_inputs_without_opencv(tmp_path, monkeypatch):
    from _tools_configs import tiny_dk_config

    import dk_detectron2.tools.demo as demo

    # Without cv2 (which Detectron2's Visualizer imports) the demo draws with PIL.
    monkeypatch.setattr(demo, "_visualizer_available", lambda: False)

    _images(str(tmp_path / "in"), count=3)
    assert len(expand_inputs([str(tmp_path / "in" / "image_*.png")])) == 3
    config = tiny_dk_config(tmp_path, dk_type="deform_kernel_conv")
    target = tmp_path / "one.png"
    image = str(tmp_path / "in" / "image_1.png")
    written = main(["--config-file", config, "--input", image, "--output", str(target)])
    assert written == [str(target)] and target.is_file()
    with pytest.raises(FileNotFoundError, match="--input"):
        expand_inputs([str(tmp_path / "missing" / "*.png")])


def test_demo_script_at_the_repository_root_has_detectron2_style_arguments(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["demo.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(ROOT, "demo.py"), run_name="__main__")
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    for flag in ("--config-file", "--input", "--output", "--confidence-threshold", "--opts"):
        assert flag in usage
