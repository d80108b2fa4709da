"""The configs shipped with dk_detectron2, reached like Detectron2's ``model_zoo.get_config_file``.

An installed wheel carries them inside the package (``dk_detectron2/configs/``); a source checkout
installed in develop mode reads them from the repository's ``configs/``::

    from dk_detectron2.model_zoo import get_config_file
    cfg.merge_from_file(get_config_file("COCO-InstanceSegmentation/mask_rcnn_dk_R_50_FPN_scratch_3x.yaml"))
"""
import os

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# Inside the package (wheel), then beside it (a checkout: <repo>/dk_detectron2 and <repo>/configs).
_ROOTS = (os.path.join(_PACKAGE, "configs"), os.path.join(os.path.dirname(_PACKAGE), "configs"))


def get_config_dir() -> str:
    """The folder that holds the shipped configs (``shapes/``, ``COCO-InstanceSegmentation/``, ...)."""
    for root in _ROOTS:
        if os.path.isdir(root):
            return root
    raise RuntimeError(f"dk_detectron2's configs are missing: looked in {', '.join(_ROOTS)}")


def get_config_file(config_path: str) -> str:
    """Absolute path of a shipped config, given relative to the configs folder, e.g.
    ``"shapes/mask_rcnn_dk_R18_FPN_shapes.yaml"``; RuntimeError naming the path if there is none."""
    path = os.path.join(get_config_dir(), config_path)
    if not os.path.isfile(path):
        raise RuntimeError(f"config_path {config_path!r} is not a shipped config (no file {path})")
    return path
