"""The Deformable Kernel benchmark suite (``python -m benchmarks``; see ``__main__.py`` and
docs/notes/benchmark.md). A tool of the repository, not part of the installed package."""
