"""The tiny DK Mask R-CNN and the image samples that the export tests share
(tests/test_export_model.py, tests/test_export_aoti.py), and the seeded non-zero generators the
layer tests give a DK module (tests/test_export_onnx.py, tests/test_export_script.py)."""
import torch

from _tools_configs import tiny_dk_config
from dk_detectron2.tools.loaders import load_model, setup_cfg


def with_random_generators(module: torch.nn.Module, std: float = 0.4) -> torch.nn.Module:
    """``module`` in eval mode with seeded random rotation and offset generators (fresh
    generators are zero, which would make every DK layer its rigid convolution)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "rotation" in name or "offset" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return module.eval()


def tiny_export_model(tmp_path, dk_type="deform_kernel_conv"):
    """The tiny DK Mask R-CNN of the tools' tests with non-zero DK generators (seeded)."""
    torch.manual_seed(0)
    model = load_model(setup_cfg(tiny_dk_config(tmp_path, dk_type), device="cpu"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "rotation_conv" in name or "offset_conv" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def image_samples(sizes=((96, 128), (128, 96), (96, 96))):
    """Random images (seeded) of the given (height, width) sizes, as export samples."""
    generator = torch.Generator().manual_seed(1)
    return [{"image": torch.rand(3, h, w, generator=generator) * 255} for h, w in sizes]
