"""mixem.bench: one module per benchmark, run through the shared harness (see bench/harness.py)."""

from mixem.bench.harness import available, run

__all__ = ["available", "run"]
