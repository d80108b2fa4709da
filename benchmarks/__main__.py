"""``python -m benchmarks``: the command line of :mod:`benchmarks`."""
from benchmarks import main

main()
