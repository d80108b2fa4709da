"""``SECTION_REGISTRY`` (separate module so that the sections can import it)."""

from detectron2.utils.registry import Registry

SECTION_REGISTRY = Registry("DK_BENCHMARK_SECTION")
