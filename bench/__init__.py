"""mixem.bench: one module per benchmark, run through the shared harness (see bench/harness.py)."""

__all__ = ["available", "run", "summary_lines"]


def __getattr__(name):
    # Lazy: the harness imports torch, and `mixem-fast bench` must be able to set the OpenMP policy
    # (mixem.runtime.passive_openmp) before that happens.
    if name in __all__:
        from mixem.bench import harness

        return getattr(harness, name)
    raise AttributeError(f"module 'mixem.bench' has no attribute {name!r}")
