"""TensorRT: build a serialized engine from model.onnx (dynamic batch profile, timing cache) and run it.

Written against NVIDIA's documented Python API (TensorRT 10.x and 11.x); tensorrt is imported lazily
so everything else works without it. Files beside the plan:
    model.plan        the serialized engine: specific to the GPU architecture and TensorRT version
    model.plan.json   sidecar: TensorRT version, GPU name, compute capability, profile shapes,
                      precision, I/O; loading refuses a plan whose version or architecture differs
    timing.cache      layer timings reused by the next build on the same GPU and TensorRT version
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from mixem.config import atomic_write, atomic_write_text
from mixem.errors import ConfigError, DataError, MixEMError, require

from .engines import Engine, _device

PLAN, TIMING_CACHE = "model.plan", "timing.cache"
TRT_INSTALL = ("pip install 'mixem-fast[trt]' (TensorRT wheels come from NVIDIA's index: "
               "pip install --extra-index-url https://pypi.nvidia.com tensorrt)")


def require_trt(feature: str = "TensorRT export"):
    """The tensorrt module, or MissingDependencyError with the install line; also needs a CUDA GPU."""
    trt = require("tensorrt", feature, TRT_INSTALL)
    if not torch.cuda.is_available():
        raise ConfigError(f"{feature} needs a CUDA GPU; none is visible to PyTorch on this machine")
    return trt


def sidecar_path(plan: str | os.PathLike) -> Path:
    return Path(str(plan) + ".json")


def current_platform(trt_version: str) -> dict:
    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt": trt_version, "gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def check_compatible(sidecar: dict, here: dict, plan: str | os.PathLike = PLAN) -> None:
    """Refuse a plan built by another TensorRT version or for another GPU architecture.

    TensorRT deserialises plans only under the exact version that built them and picks kernels per
    compute capability; GPUs of one architecture (e.g. H100 PCIe vs SXM) share plans, so the GPU
    name is reported but not compared.
    """
    for key, what in (("tensorrt", "TensorRT version"), ("compute_capability", "GPU compute capability")):
        if str(sidecar.get(key)) != str(here[key]):
            raise MixEMError(
                f"{plan}: built for {what} {sidecar.get(key)} ({sidecar.get('gpu')}, TensorRT {sidecar.get('tensorrt')}), "
                f"this machine has {here[key]} ({here['gpu']}, TensorRT {here['tensorrt']}); "
                f"rebuild it here with `mixem-fast export CKPT --format trt`")


def build_trt_engine(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, *, fp16: bool = False,
                     min_batch: int = 1, opt_batch: int = 64, max_batch: int = 256, workspace_gib: float = 4.0,
                     timing_cache: str | os.PathLike | None = None) -> dict:
    """Build plan_path from onnx_path with one optimisation profile over the batch axis; returns the sidecar.

    fp16: on TensorRT 10 the fp32 ONNX plus BuilderFlag.FP16 (TensorRT picks fp16 kernels where it
    helps); TensorRT 11 removed that flag and builds strongly typed networks, so there onnx_path must
    already be the fp16 ONNX (export_onnx(fp16=True)), whose types TensorRT then follows.
    """
    trt = require_trt()
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ConfigError(f"batch sizes must satisfy 1 <= min ({min_batch}) <= opt ({opt_batch}) <= max ({max_batch})")
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    t0 = time.perf_counter()
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
    profile.set_shape(inp.name, (min_batch, C, H, W), (opt_batch, C, H, W), (max_batch, C, H, W))
    config.add_optimization_profile(profile)
    cache_file = Path(timing_cache) if timing_cache else plan_path.parent / TIMING_CACHE
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    # ignore_mismatch=False: a cache from another GPU or TensorRT version is refused (False), and this
    # build starts from an empty cache that then replaces the stale file.
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise MixEMError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    atomic_write(plan_path, lambda t: t.write_bytes(memoryview(plan)))
    cache = memoryview(config.get_timing_cache().serialize())
    atomic_write(cache_file, lambda t: t.write_bytes(cache))
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    side = {**current_platform(trt.__version__),
            "precision": "fp16" if fp16 else "fp32",
            "fp16_mode": ("BuilderFlag.FP16" if weak_fp16 else "strongly typed fp16 ONNX") if fp16 else None,
            "onnx": str(onnx_path), "timing_cache": str(cache_file),
            "profile": {"min": [min_batch, C, H, W], "opt": [opt_batch, C, H, W], "max": [max_batch, C, H, W]},
            "input": {"name": inp.name, "dtype": str(inp.dtype)},
            "outputs": [{"name": o.name, "dtype": str(o.dtype), "shape": [int(d) for d in o.shape]} for o in outputs],
            "image_size": int(H), "in_channels": int(C), "build_seconds": round(time.perf_counter() - t0, 2)}
    atomic_write_text(sidecar_path(plan_path), json.dumps(side, indent=2) + "\n")
    return side


class TrtEngine(Engine):
    """A deserialized plan run with execute_async_v3 on the current torch stream, torch tensors as I/O."""

    name = "trt"

    def __init__(self, path, device="auto"):
        trt = require_trt("the trt engine")
        p = Path(path)
        p = p / PLAN if p.is_dir() else p
        side_file = sidecar_path(p)
        if not p.is_file() or not side_file.is_file():
            raise DataError(f"{p}: a TensorRT plan needs {p.name} and {side_file.name}; "
                            f"build them with `mixem-fast export CKPT --format trt --out DIR`")
        side = json.loads(side_file.read_text())
        self.device = _device(device)
        if self.device.type != "cuda":
            raise ConfigError(f"the trt engine runs on CUDA devices only, not {self.device}")
        with torch.cuda.device(self.device):
            check_compatible(side, current_platform(trt.__version__), p)
            self._logger = trt.Logger(trt.Logger.WARNING)
            self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(p.read_bytes())
            if self.engine is None:
                raise MixEMError(f"{p}: TensorRT could not deserialize this plan (see the TensorRT log above)")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        ins = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.input_name = ins[0]
        self.outputs = tuple(n for n in names if n not in ins)
        self._dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.image_size, self.in_channels = int(side["image_size"]), int(side["in_channels"])
        self.min_batch, self.max_batch = side["profile"]["min"][0], side["profile"]["max"][0]
        self.provider = f"TensorRT {trt.__version__} {side['precision']}"
        self.sidecar = side

    def _run(self, x):
        x = (torch.from_numpy(x) if not isinstance(x, torch.Tensor) else x).to(self.device).contiguous()
        x = x.to(self._dtypes[self.input_name])
        ctx = self.context
        ctx.set_input_shape(self.input_name, tuple(x.shape))
        ctx.set_tensor_address(self.input_name, x.data_ptr())
        outs = []
        for name in self.outputs:
            o = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=self._dtypes[name], device=self.device)
            ctx.set_tensor_address(name, o.data_ptr())
            outs.append(o)
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise MixEMError("trt engine: execute_async_v3 failed (see the TensorRT log above)")
        # No sync: x and the outputs belong to this stream, so the caching allocator cannot hand their
        # memory to later work before this run is done, and consumers on the stream are ordered after it.
        return tuple(o.float() for o in outs)


def _torch_dtype(trt, dt) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.UINT8: torch.uint8,
             trt.DataType.INT32: torch.int32}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    if dt not in table:
        raise MixEMError(f"trt engine: unsupported I/O tensor type {dt}")
    return table[dt]
