"""export_checkpoint: a checkpoint to the format asked for, the function behind `mixem-fast export`."""

from __future__ import annotations

import os

from mixem.config import EXPORT_FORMATS, TRT_PROFILE
from mixem.errors import ConfigError
from mixem.export.onnx import OPSET, export_onnx


def export_checkpoint(
    ckpt: str | os.PathLike,
    fmt: str = "onnx",
    out_dir: str | os.PathLike = "export",
    *,
    fp16: bool = False,
    features: bool = False,
    min_batch: int = TRT_PROFILE[0],
    opt_batch: int = TRT_PROFILE[1],
    max_batch: int = TRT_PROFILE[2],
    opset: int = OPSET,
) -> dict:
    """Export a checkpoint (dir, run dir or model.safetensors) into out_dir; returns a summary for printing.

    onnx: out_dir/model.onnx (+ parity.json, export.json, config.json), parity-gated against PyTorch.
    trt:  the same ONNX, then out_dir/model.plan + model.plan.json built for this GPU, parity-gated too.
    Summary keys: format, path, precision, parity {min_cosine, max_prob_error, argmax_agreement, ...},
    seconds, and for trt: onnx, tensorrt, gpu, profile.
    """
    if fmt == "onnx":
        return export_onnx(ckpt, out_dir, fp16=fp16, features=features, opset=opset)
    if fmt == "trt":
        from mixem.export.tensorrt import export_trt

        return export_trt(
            ckpt,
            out_dir,
            fp16=fp16,
            features=features,
            min_batch=min_batch,
            opt_batch=opt_batch,
            max_batch=max_batch,
            opset=opset,
        )
    raise ConfigError(f"unknown export format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
