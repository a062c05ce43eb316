"""mixem-fast: MIX'EM unsupervised image classification with fused kernels, export and FAISS clustering.

The Python API (the CLI is a thin shell over it): `mixem.load`, `mixem.train`, `mixem.embed_folder`,
`mixem.classify`, `mixem.cluster`. Each is imported on first use, so `import mixem` stays cheap (no torch).
"""

__version__ = "0.1.0"

_API = {
    "load": "mixem.predictor",
    "Model": "mixem.predictor",
    "Prediction": "mixem.predictor",
    "train": "mixem.api",
    "embed_folder": "mixem.api",
    "classify": "mixem.api",
    "cluster": "mixem.api",
    "TrainResult": "mixem.api",
    "EmbedResult": "mixem.api",
    "ClusterResult": "mixem.api",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'mixem' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
