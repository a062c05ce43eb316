"""Engines: one inference interface over checkpoints (torch), ONNX models (onnxruntime) and TensorRT plans.

`load_engine(path, engine)` returns an Engine: engine(uint8 (B, C, S, S)) -> (embedding, mixture_probs
[, features]) as float32 torch tensors. `embed`, `classify` and `search` run models only through this.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mixem.config import ENGINES
from mixem.engines.base import Engine
from mixem.errors import ConfigError
from mixem.files import sha256_file

__all__ = ["Engine", "load_engine", "model_identity"]


def load_engine(path: str | os.PathLike, engine: str = "torch", device="auto", **options) -> Engine:
    """An Engine over `path`: a checkpoint (torch), a .onnx file or export dir (onnx), a .plan or export dir (trt).

    options: torch: precision ("auto"|"fp32"|"fp16"|"bf16"), compile, features; onnx: threads.
    """
    # Imported on use: each engine pulls in its own runtime (onnxruntime, tensorrt).
    if engine == "torch":
        from mixem.engines.torch_engine import TorchEngine

        return TorchEngine(path, device, **options)
    if engine == "onnx":
        from mixem.engines.onnx_engine import OnnxEngine

        return OnnxEngine(path, device, **options)
    if engine == "trt":
        from mixem.engines.trt_engine import TrtEngine

        return TrtEngine(path, device, **options)
    raise ConfigError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")


def model_identity(engine: Engine) -> tuple[str, str]:
    """(absolute path of the model the engine loaded, sha256 over the files that define it).

    The path is where it was found; the digest is what it is: a model moved elsewhere keeps its digest,
    a checkpoint retrained in place does not.
    """
    h = hashlib.sha256()
    for f in engine.files:
        h.update(Path(f).name.encode() + b"\0")
        sha256_file(f, h)
    return str(Path(engine.path).resolve()), h.hexdigest()
