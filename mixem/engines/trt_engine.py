"""The trt engine: a TensorRT plan (built by mixem.export.tensorrt) run with execute_async_v3 on torch's stream.

Written against NVIDIA's documented Python API (TensorRT 10.x and 11.x); tensorrt is imported lazily
so everything else works without it. Files beside the plan:
    model.plan        the serialized engine: specific to the GPU architecture and TensorRT version
    model.plan.json   sidecar: TensorRT version, GPU name, compute capability, profile shapes,
                      precision, I/O, parity; loading refuses a plan whose version or architecture differs
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mixem.engines.base import Engine
from mixem.errors import ConfigError, DataError, MixEMError, require
from mixem.runtime import resolve_device

PLAN = "model.plan"
TRT_INSTALL = (
    "pip install 'mixem-fast[trt]' (TensorRT wheels come from NVIDIA's index: "
    "pip install --extra-index-url https://pypi.nvidia.com tensorrt)"
)


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
                f"rebuild it here with `mixem-fast export CKPT --format trt`"
            )


class TrtEngine(Engine):
    """A deserialized plan run with execute_async_v3 on the current torch stream, torch tensors as I/O."""

    name = "trt"

    def __init__(self, path, device="auto", sidecar: dict | None = None):
        """sidecar: the plan's description when it is not on disk yet (the export's parity gate)."""
        trt = require_trt("the trt engine")
        p = Path(path)
        p = p / PLAN if p.is_dir() else p
        side_file = sidecar_path(p)
        if not p.is_file() or (sidecar is None and not side_file.is_file()):
            raise DataError(
                f"{p}: a TensorRT plan needs {p.name} and {side_file.name}; "
                f"build them with `mixem-fast export CKPT --format trt --out DIR`"
            )
        side = sidecar if sidecar is not None else json.loads(side_file.read_text())
        self.device = resolve_device(device)
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
        self.path, self.files = str(p), (str(p), str(side_file))

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
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.UINT8: torch.uint8,
        trt.DataType.INT32: torch.int32,
    }
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    if dt not in table:
        raise MixEMError(f"trt engine: unsupported I/O tensor type {dt}")
    return table[dt]
