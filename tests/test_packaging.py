"""Packaging: the source distribution carries the C++/CUDA sources, headers and configs; the
package builds as a wheel against the installed torch, installs elsewhere and works from outside
the checkout, configs included; an isolated build (pip's default, no torch) stops with a message
that says what to do."""
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "requirements.txt", "csrc",
           "dk_detectron2", "configs"]


def _copy_sources(target):
    """The files a build reads, without build outputs (so the checkout's build/ is untouched)."""
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info")
    os.makedirs(target, exist_ok=True)
    for name in SOURCES:
        src, dst = os.path.join(REPO, name), os.path.join(target, name)
        if os.path.isdir(src):
            shutil.copytree(src, dst, ignore=ignore, symlinks=True)
        else:
            shutil.copy2(src, dst)


def test_setup_without_torch_explains_no_build_isolation():
    """What pip's isolated build runs into: setup.py must name the fix."""
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "pip install --no-build-isolation -e ." in proc.stderr, proc.stderr[-2000:]


def _files_under(folder, suffixes):
    root = os.path.join(REPO, folder)
    return {os.path.relpath(os.path.join(d, f), REPO) for d, _, files in os.walk(root)
            for f in files if f.endswith(suffixes) and "__pycache__" not in d}


def test_sdist_carries_sources_headers_and_configs(tmp_path):
    """`setup.py sdist` (no compile): every csrc source and header, every config, the README, the
    requirements and the package's modules, and no build output."""
    source, dist = tmp_path / "src", tmp_path / "dist"
    _copy_sources(str(source))
    env = dict(os.environ, DK_WITH_CUDA="0")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--formats=gztar", "-d",
                           str(dist)], cwd=str(source), env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (archive,) = dist.iterdir()
    with tarfile.open(archive) as tar:
        top = f"{archive.name[:-len('.tar.gz')]}/"
        shipped = {m.name[len(top):] for m in tar.getmembers() if m.isfile()}
    expected = _files_under("csrc", (".h", ".cuh", ".cpp", ".cu"))
    expected |= _files_under("configs", (".yaml", ".py"))
    expected |= _files_under("dk_detectron2", (".py",))
    expected |= {"pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "requirements.txt"}
    assert any(name.endswith(".cuh") for name in expected)  # the check covers the CUDA headers
    assert expected <= shipped, sorted(expected - shipped)
    assert not [name for name in shipped if name.endswith((".so", ".pyc", ".o"))]


@pytest.mark.slow
def test_wheel_installs_and_imports_outside_the_checkout(tmp_path):
    source, wheels, site, elsewhere = (tmp_path / d for d in ("src", "wheels", "site", "cwd"))
    for d in (wheels, site, elsewhere):
        d.mkdir()
    _copy_sources(str(source))
    env = dict(os.environ, DK_WITH_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    env.pop("PYTHONPATH", None)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
         "-w", str(wheels), str(source)], env=env, capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, (build.stdout + build.stderr)[-4000:]
    built = [w for w in os.listdir(wheels) if w.startswith("dk_detectron2-") and w.endswith(".whl")]
    assert len(built) == 1, os.listdir(wheels)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
         str(site), str(wheels / built[0])], env=env, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, (install.stdout + install.stderr)[-4000:]

    check = textwrap.dedent(f"""
        import importlib.resources, os, torch
        import dk_detectron2
        from dk_detectron2.layers import _extension, deform_kernel2d
        site = {str(site)!r}
        assert dk_detectron2.__file__.startswith(site), dk_detectron2.__file__
        assert _extension.extension_path().startswith(site), _extension.extension_path()
        assert not _extension.compiled_with_cuda()
        x, w = torch.randn(1, 4, 6, 6), torch.randn(4, 1, 3, 3)
        out = deform_kernel2d(x, torch.zeros(1, 18, 6, 6), w, 3, padding=1)
        ref = torch.nn.functional.conv2d(x, w, padding=1, groups=4)
        torch.testing.assert_close(out, ref)

        configs = importlib.resources.files("dk_detectron2") / "configs"
        from detectron2.config import LazyConfig, get_cfg
        from detectron2.modeling import build_model
        # pip byte-compiles the installed .py files; the configs are the .yaml and .py ones
        names = sorted(str(p.relative_to(configs)) for p in
                       __import__("pathlib").Path(str(configs)).rglob("*")
                       if p.is_file() and p.suffix in (".yaml", ".py"))
        print("\\n".join(names))
        cfg = get_cfg(); dk_detectron2.add_dk_config(cfg)
        cfg.merge_from_file(str(configs / "COCO-InstanceSegmentation" /
                                "mask_rcnn_dk_R_50_FPN_scratch_3x.yaml"))
        assert cfg.MODEL.BACKBONE.NAME == "build_resnet_dk_fpn_backbone", cfg.MODEL.BACKBONE.NAME
        cfg = get_cfg(); dk_detectron2.add_dk_config(cfg)
        cfg.merge_from_file(str(configs / "shapes" / "mask_rcnn_dk_R18_FPN_shapes.yaml"))
        cfg.MODEL.DEVICE = "cpu"
        model = build_model(cfg)
        assert any("DeformKernel" in type(m).__name__ for m in model.modules())
        from dk_detectron2.model_zoo import get_config_file
        assert get_config_file("shapes/Base-Shapes.yaml") == str(configs / "shapes" / "Base-Shapes.yaml")
        lazy = LazyConfig.load(str(configs / "mask_rcnn_dk_R_50_FPN_scratch_3x.py"))
        assert "model" in lazy
        print("OK")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    run = subprocess.run([sys.executable, "-c", check], cwd=str(elsewhere), env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), \
        (run.stdout + run.stderr)[-4000:]
    shipped = set(run.stdout.split()[:-1])
    in_repo = {os.path.relpath(os.path.join(d, f), os.path.join(REPO, "configs"))
               for d, _, files in os.walk(os.path.join(REPO, "configs")) for f in files
               if f.endswith((".yaml", ".py"))}
    assert shipped == in_repo


def test_get_config_file_finds_the_checkouts_configs():
    from dk_detectron2.model_zoo import get_config_file

    path = get_config_file("shapes/mask_rcnn_dk_R18_FPN_shapes.yaml")
    assert path == os.path.join(REPO, "configs", "shapes", "mask_rcnn_dk_R18_FPN_shapes.yaml")
    with pytest.raises(RuntimeError, match="config_path 'shapes/nothing.yaml'"):
        get_config_file("shapes/nothing.yaml")
