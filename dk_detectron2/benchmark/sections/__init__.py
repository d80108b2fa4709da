"""The benchmark sections. ``SECTION_REGISTRY`` maps a section name to ``run(args, progress)``.

``run`` receives the parsed command line (see :mod:`dk_detectron2.benchmark.cli`) and a
``progress(total, desc)`` factory of tqdm bars, and returns a JSON-serialisable dict that
:mod:`dk_detectron2.benchmark.targets` and :mod:`dk_detectron2.benchmark.report` read.
Sections: ``ops`` (op-level timings and ratios), ``full_dk`` (groups-1 DK vs ``F.conv2d``),
``memory`` (peak extra memory, column-buffer check), ``scaling`` (H*W and threads), ``model``
(Mask R-CNN R50-FPN), ``cuda`` (the op benchmarks on a GPU, with DRAM bandwidth).
"""

from .registry import SECTION_REGISTRY
from . import ops, full_dk, memory, scaling, model, cuda  # noqa: F401,E402  (register the sections)

__all__ = ["SECTION_REGISTRY"]
