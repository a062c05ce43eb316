"""TensorRT export: build a serialized plan from model.onnx (dynamic batch profile, timing cache), parity-gated.

Files beside the plan: model.plan and model.plan.json (see mixem.engines.trt_engine, which runs them) and
timing.cache, the layer timings reused by the next build on the same GPU and TensorRT version.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mixem.config import TRT_PROFILE
from mixem.engines.onnx_engine import MODEL
from mixem.engines.trt_engine import PLAN, TrtEngine, current_platform, require_trt, sidecar_path
from mixem.errors import ConfigError, MixEMError
from mixem.export import parity
from mixem.export.onnx import OPSET, PARITY_IMAGES, claim_export, export_onnx, onnx_reference
from mixem.files import atomic_write, atomic_write_text

TIMING_CACHE = "timing.cache"


def build_trt_engine(
    onnx_path: str | os.PathLike,
    plan_path: str | os.PathLike,
    *,
    fp16: bool = False,
    min_batch: int = TRT_PROFILE[0],
    opt_batch: int = TRT_PROFILE[1],
    max_batch: int = TRT_PROFILE[2],
    workspace_gib: float = 4.0,
    timing_cache: str | os.PathLike | None = None,
    gate=None,
) -> dict:
    """Build plan_path from onnx_path with one optimisation profile over the batch axis; returns the sidecar.

    fp16: on TensorRT 10 the fp32 ONNX plus BuilderFlag.FP16 (TensorRT picks fp16 kernels where it
    helps); TensorRT 11 removed that flag and builds strongly typed networks, so there onnx_path must
    already be the fp16 ONNX (export_onnx(fp16=True)), whose types TensorRT then follows.
    gate(engine) -> report runs on the built plan before its sidecar is written, and raises to refuse it:
    a refused plan is removed, so no plan without a passed check is ever left to load.
    """
    trt = require_trt()
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ConfigError(f"batch sizes must satisfy 1 <= min ({min_batch}) <= opt ({opt_batch}) <= max ({max_batch})")
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    t0 = time.perf_counter()
    cache_file = Path(timing_cache) if timing_cache else plan_path.parent / TIMING_CACHE
    plan, network, fp16_mode = _build(
        trt, onnx_path, fp16, (min_batch, opt_batch, max_batch), workspace_gib, cache_file
    )
    atomic_write(plan_path, lambda t: t.write_bytes(memoryview(plan)))
    inp = network.get_input(0)
    _, C, H, W = tuple(inp.shape)
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    side = {
        **current_platform(trt.__version__),
        "precision": "fp16" if fp16 else "fp32",
        "fp16_mode": fp16_mode,
        "onnx": str(onnx_path),
        "timing_cache": str(cache_file),
        "profile": {"min": [min_batch, C, H, W], "opt": [opt_batch, C, H, W], "max": [max_batch, C, H, W]},
        "input": {"name": inp.name, "dtype": str(inp.dtype)},
        "outputs": [{"name": o.name, "dtype": str(o.dtype), "shape": [int(d) for d in o.shape]} for o in outputs],
        "image_size": int(H),
        "in_channels": int(C),
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    if gate is not None:
        try:
            side["parity"] = gate(TrtEngine(plan_path, sidecar=side))
        except BaseException:
            plan_path.unlink(missing_ok=True)
            raise
    atomic_write_text(sidecar_path(plan_path), json.dumps(side, indent=2) + "\n")
    return side


def _build(trt, onnx_path: Path, fp16: bool, batches: tuple[int, int, int], workspace_gib: float, cache_file: Path):
    """(serialized plan, parsed network, fp16 mode) for one profile over the batch axis; updates the timing cache."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    weak_fp16 = fp16 and hasattr(trt.BuilderFlag, "FP16")
    flags = 0
    if not weak_fp16 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        # Required for fp16 on 11.x (always on there; the flag is accepted and ignored), opt-in on 10.x.
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise MixEMError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors[:400]}")
    inp = network.get_input(0)
    _, C, H, W = tuple(inp.shape)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if weak_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, *((b, C, H, W) for b in batches))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    # ignore_mismatch=False: a cache from another GPU or TensorRT version is refused (False), and this
    # build starts from an empty cache that then replaces the stale file.
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise MixEMError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    serialized = memoryview(config.get_timing_cache().serialize())
    atomic_write(cache_file, lambda t: t.write_bytes(serialized))
    fp16_mode = ("BuilderFlag.FP16" if weak_fp16 else "strongly typed fp16 ONNX") if fp16 else None
    return plan, network, fp16_mode


def export_trt(
    ckpt: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    fp16: bool = False,
    features: bool = False,
    min_batch: int = TRT_PROFILE[0],
    opt_batch: int = TRT_PROFILE[1],
    max_batch: int = TRT_PROFILE[2],
    opset: int = OPSET,
) -> dict:
    """out_dir/model.onnx (parity-gated), then out_dir/model.plan + model.plan.json built for this GPU, whose
    outputs are parity-gated against PyTorch on real images like the ONNX (a failing plan is removed)."""
    trt = require_trt()  # before the ONNX export, so a missing TensorRT fails in a second, not after it
    with claim_export(out_dir):  # one owner for the ONNX set and the plan built from it
        return _export_trt(trt, ckpt, out_dir, fp16, features, min_batch, opt_batch, max_batch, opset)


def _export_trt(trt, ckpt, out_dir, fp16, features, min_batch, opt_batch, max_batch, opset) -> dict:
    # TensorRT 11 has no fp16 builder flag: it builds what the (fp16) ONNX says.
    onnx_fp16 = fp16 and not hasattr(trt.BuilderFlag, "FP16")
    onnx_summary = export_onnx(ckpt, out_dir, fp16=onnx_fp16, features=features, opset=opset)
    plan = Path(out_dir) / PLAN
    precision = "fp16" if fp16 else "fp32"

    def gate(engine) -> dict:
        report = _parity(ckpt, engine, features, precision, min_batch, max_batch)
        if not report["passed"]:
            raise MixEMError(f"{plan}: " + parity.failure_line(report, "TensorRT " + precision))
        return report

    side = build_trt_engine(
        Path(out_dir) / MODEL, plan, fp16=fp16, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, gate=gate
    )
    keys = ("images", "min_cosine", "max_prob_error", "argmax_agreement", "passed")
    return {
        "format": "trt",
        "path": str(plan),
        "precision": side["precision"],
        "onnx": onnx_summary["path"],
        "tensorrt": side["tensorrt"],
        "gpu": side["gpu"],
        "compute_capability": side["compute_capability"],
        "profile": side["profile"],
        "parity": {k: side["parity"][k] for k in keys},
        "seconds": round(onnx_summary["seconds"] + side["build_seconds"], 2),
    }


def _parity(ckpt, engine, features: bool, precision: str, min_batch: int, max_batch: int) -> dict:
    from mixem.checkpoint import load_model

    model, cfg = load_model(ckpt, "cpu")
    batches = tuple(min(max(b, min_batch), max_batch) for b in parity.PARITY_BATCHES)
    # Every chunk must fit the profile, the last one included: use a whole number of cycles.
    n = max(1, PARITY_IMAGES // sum(batches)) * sum(batches)
    images = parity.real_images(n, cfg.image_size, cfg.in_channels)
    report = parity.compare(onnx_reference(model, features), engine, images, batches)
    report = parity.gate(report, precision)
    report["runtime"] = f"{engine.provider} vs PyTorch fp32 CPU"
    return report
