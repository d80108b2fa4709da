"""AOTInductor packages: a tiny DK Mask R-CNN's trunk through the export tool's
``export_and_verify``, and DK layers that run with only the operator library loaded, from Python
without dk_detectron2's modules and from a C++ program (examples/aoti_cpp)."""
import os
import subprocess
import sys

import pytest
import torch

from dk_detectron2.export.program import export_program, load_aoti, package_aoti
from dk_detectron2.layers import DeformKernelConv2d, _extension

pytestmark = pytest.mark.slow  # an AOTInductor compilation and a C++ build: minutes on 2 cores
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4


class _SmallDK(torch.nn.Module):
    """A conv and a DK + DCN layer: a quick stand-in for a backbone."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.dk = DeformKernelConv2d(8, 8, 3, padding=1, groups=8, scope_size=5)
        with torch.no_grad():
            self.stem.weight.mul_(0.01)  # pixel values up to 255
            self.dk.rotation_conv.weight.normal_(0, 0.1)
            self.dk.offset_conv.weight.normal_(0, 0.1)

    def forward(self, x):
        return self.dk(torch.relu(self.stem(x)))


@pytest.fixture(scope="module")
def small_package(tmp_path_factory):
    torch.manual_seed(0)
    module = _SmallDK().eval()
    dims = {0: torch.export.Dim("batch", min=1, max=16),
            2: torch.export.Dim("height", min=4, max=64),
            3: torch.export.Dim("width", min=4, max=64)}
    program = export_program(module, (torch.rand(2, 3, 12, 10) * 255,), None, (dims,))
    path = str(tmp_path_factory.mktemp("aoti") / "small_aoti.pt2")
    return module, package_aoti(program, path)


def test_export_and_verify_packages_a_tiny_dk_mask_rcnn_trunk(tmp_path):
    """The ``aoti`` format as the tool runs it: exported, compiled, reloaded from disk and
    compared with eager on three image sizes one at a time and on one padded batch of all."""
    from _export_models import image_samples, tiny_export_model

    from dk_detectron2.tools.export import export_and_verify

    model = tiny_export_model(tmp_path, "deform_kernel_conv")
    report = export_and_verify(model, image_samples(), "aoti", str(tmp_path / "out"), repeats=1)
    assert report["part"] == "trunk" and report["fixed_batch"] is None
    assert os.path.isfile(report["artefact"])
    assert report["shapes_equal"] == 1.0 and report["max_rel"] <= TOLERANCE
    assert report["batched"]["shapes_equal"] == 1.0
    assert report["batched"]["max_rel"] <= TOLERANCE


def test_package_agrees_with_eager_at_other_batch_and_sizes(small_package):
    module, package = small_package
    runner = load_aoti(package)
    for shape in [(1, 3, 12, 10), (3, 3, 9, 15), (2, 3, 33, 20)]:
        x = torch.rand(shape) * 255
        with torch.no_grad():
            expected, found = module(x), runner(x)
        found = found[0] if isinstance(found, (list, tuple)) else found
        assert float((found - expected).abs().max()) <= TOLERANCE * float(expected.abs().max())


def test_package_runs_with_only_the_operator_library(small_package, tmp_path):
    module, package = small_package
    x = torch.rand(3, 3, 9, 15) * 255
    with torch.no_grad():
        torch.save({"x": x, "y": module(x)}, tmp_path / "io.pt")
    code = (
        "import sys, torch\n"
        f"torch.ops.load_library({_extension.extension_path()!r})\n"
        f"runner = torch._inductor.aoti_load_package({package!r})\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "y = runner(io['x'])\n"
        "y = y[0] if isinstance(y, (list, tuple)) else y\n"
        "assert not [m for m in sys.modules if m.startswith('dk_detectron2')], 'imported'\n"
        "print(float((y - io['y']).abs().max() / io['y'].abs().max()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) <= TOLERANCE


def test_cpp_program_runs_the_package(small_package, tmp_path):
    module, package = small_package
    binary = str(tmp_path / "run_package")
    venv_python = os.path.join(ROOT, ".venv", "bin", "python")
    env = dict(os.environ)
    env.pop("PYTHON", None)
    # Another environment than the repo's .venv (a venv's python is a link to its base
    # interpreter, so the environment is told by its prefix, not by the interpreter's file).
    if os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(ROOT, ".venv")):
        env["PYTHON"] = sys.executable  # otherwise the script's default, the repo's .venv
    build = subprocess.run(["bash", os.path.join(ROOT, "examples", "aoti_cpp", "build.sh"), binary],
                           capture_output=True, text=True, env=env)
    assert build.returncode == 0, build.stderr[-3000:]
    assert f"using Python: {env.get('PYTHON', venv_python)}" in build.stderr
    height, width = 12, 20
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")  # the package loads libtorch
    env = {**os.environ, "LD_LIBRARY_PATH": torch_lib}
    run = subprocess.run([binary, _extension.extension_path(), package, str(height), str(width)],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    line = [text for text in run.stdout.splitlines() if text.startswith("output 0")][0]
    assert f"[1, 8, {height}, {width}]" in line
    ramp = torch.linspace(0, 1, width).view(1, 1, 1, width)
    image = torch.full((1, 3, height, width), 128.0) + 64.0 * ramp
    with torch.no_grad():
        output = module(image)
    found = float(line.split("sum")[-1])
    assert abs(found - float(output.sum())) <= TOLERANCE * max(1.0, float(output.abs().sum()))
