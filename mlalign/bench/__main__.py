"""`python -m mlalign.bench`: see the package docstring."""

from mlalign.bench.runner import main

main()
