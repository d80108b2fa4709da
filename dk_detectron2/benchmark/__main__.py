"""``python -m dk_detectron2.benchmark``: see :mod:`dk_detectron2.benchmark.cli`."""

from .cli import main

if __name__ == "__main__":
    main()
