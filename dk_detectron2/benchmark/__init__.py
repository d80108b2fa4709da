"""The Deformable Kernel benchmark suite: ``python -m dk_detectron2.benchmark [--quick] ...``.

Measures in one run, as ratios to their baselines (min and median over repeats, with the thread
count): the DK operators against depthwise convolution and torchvision's deformable convolution
on a ResNet-50's shapes, the full (groups 1) DK against ``F.conv2d``, peak extra memory, H*W and
thread scaling, Mask R-CNN R50-FPN with the DK backbone against plain convolutions, and, with a
GPU, the same op benchmarks in float32/float16/bfloat16 with achieved DRAM bandwidth. Writes a
terminal table with the issue's targets (PASS/MISS), ``results.json``, ``results.md`` and
``results.png``. See ``docs/notes/benchmark.md``.
"""

from .cli import main, run_benchmarks

__all__ = ["main", "run_benchmarks"]
