"""dk_detectron2: Deformable Kernels (Gao et al., ICLR 2020) for Detectron2.

``import dk_detectron2`` loads the compiled operators, registers the DK backbones in Detectron2's
``BACKBONE_REGISTRY`` and the embedded datasets, adds the DK operators' FLOP and activation
handles to fvcore's defaults (so fvcore's and Detectron2's ``FlopCountAnalysis`` count them),
registers the DK classification models in timm's registry (``timm.create_model("dk_resnet50_dw")``,
:mod:`dk_detectron2.classification`), and exposes ``add_dk_config``.
"""
from . import layers  # noqa: F401
from . import modeling  # noqa: F401  (registers the DK backbones)
from .config import add_dk_config  # noqa: F401
from . import data  # noqa: F401
from . import model_zoo  # noqa: F401  (get_config_file: the shipped configs)
from . import classification  # noqa: F401  (registers the DK classification models in timm)
from .tools.flops import register_default_handles as _register_flop_handles

_register_flop_handles()

__version__ = "0.1.0"
