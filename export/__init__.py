"""mixem.export: checkpoint -> ONNX / TensorRT, and load_engine() to run any of them the same way."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mixem.config import EXPORT_FORMATS, atomic_write_text
from mixem.errors import ConfigError, MixEMError

from .engines import Engine, load_engine
from .onnx import OPSET, export_onnx
from .tensorrt import build_trt_engine

__all__ = ["Engine", "load_engine", "export_onnx", "build_trt_engine", "export_checkpoint", "OPSET"]


def export_checkpoint(ckpt: str | os.PathLike, fmt: str = "onnx", out_dir: str | os.PathLike = "export", *,
                      fp16: bool = False, features: bool = False, min_batch: int = 1, opt_batch: int = 64,
                      max_batch: int = 256, opset: int = OPSET) -> dict:
    """Export a checkpoint (dir, run dir or model.safetensors) into out_dir; returns a summary for printing.

    onnx: out_dir/model.onnx (+ parity.json, export.json, config.json), parity-gated against PyTorch.
    trt:  the same ONNX, then out_dir/model.plan + model.plan.json built for this GPU, whose outputs
          are parity-gated against PyTorch on real images like the ONNX (the plan is removed on failure).
    Summary keys: format, path, precision, parity {min_cosine, max_prob_error, argmax_agreement, ...},
    seconds, and for trt: onnx, tensorrt, gpu, profile.
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "onnx":
        return export_onnx(ckpt, out_dir, fp16=fp16, features=features, opset=opset)
    from .tensorrt import require_trt

    trt = require_trt()  # before the ONNX export, so a missing TensorRT fails in a second, not after it
    # TensorRT 11 has no fp16 builder flag: it builds what the (fp16) ONNX says.
    onnx_fp16 = fp16 and not hasattr(trt.BuilderFlag, "FP16")
    onnx_summary = export_onnx(ckpt, out_dir, fp16=onnx_fp16, features=features, opset=opset)
    out = Path(out_dir)
    plan = out / "model.plan"
    side = build_trt_engine(out / "model.onnx", plan, fp16=fp16, min_batch=min_batch, opt_batch=opt_batch,
                            max_batch=max_batch)
    report = _trt_parity(ckpt, plan, features, "fp16" if fp16 else "fp32", min_batch, max_batch)
    side["parity"] = report
    from .tensorrt import sidecar_path

    if not report["passed"]:
        from .parity import failure_line

        plan.unlink(missing_ok=True)
        sidecar_path(plan).unlink(missing_ok=True)
        raise MixEMError(f"{plan}: " + failure_line(report, "TensorRT " + side["precision"]))
    atomic_write_text(sidecar_path(plan), json.dumps(side, indent=2) + "\n")
    keys = ("images", "min_cosine", "max_prob_error", "argmax_agreement", "passed")
    return {"format": "trt", "path": str(plan), "precision": side["precision"], "onnx": onnx_summary["path"],
            "tensorrt": side["tensorrt"], "gpu": side["gpu"], "compute_capability": side["compute_capability"],
            "profile": side["profile"], "parity": {k: report[k] for k in keys},
            "seconds": round(onnx_summary["seconds"] + side["build_seconds"], 2)}


def _trt_parity(ckpt, plan: Path, features: bool, precision: str, min_batch: int, max_batch: int) -> dict:
    from mixem.checkpoint import load_model

    from . import parity
    from .onnx import PARITY_IMAGES, onnx_reference
    from .tensorrt import TrtEngine

    model, cfg = load_model(ckpt, "cpu")
    engine = TrtEngine(plan)
    batches = tuple(min(max(b, min_batch), max_batch) for b in parity.PARITY_BATCHES)
    # Every chunk must fit the profile, the last one included: use a whole number of cycles.
    n = max(1, PARITY_IMAGES // sum(batches)) * sum(batches)
    images = parity.real_images(n, cfg.image_size, cfg.in_channels)
    report = parity.compare(onnx_reference(model, features), engine, images, batches)
    report = parity.gate(report, precision)
    report["runtime"] = f"{engine.provider} vs PyTorch fp32 CPU"
    return report
