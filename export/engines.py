"""One inference interface over PyTorch checkpoints, ONNX models and TensorRT plans: load_engine()."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch

from mixem.config import ENGINES
from mixem.errors import ConfigError, DataError, MissingDependencyError, require

_ORT_GPU_INSTALL = "pip install onnxruntime-gpu  (replaces the CPU-only onnxruntime)"


class Engine:
    """engine(uint8 (B, C, S, S) tensor or ndarray) -> (embedding (B, D), mixture_probs (B, K)[, features (B, F)]).

    Outputs are float32 torch tensors on `device`. `provider` says what actually runs the graph
    (e.g. "CPUExecutionProvider"), `outputs` names the returned tensors in order.
    """

    name: str
    device: torch.device
    image_size: int
    in_channels: int
    provider: str
    outputs: tuple[str, ...] = ("embedding", "mixture_probs")
    max_batch: int | None = None  # None = any batch size
    min_batch: int = 1  # a smaller batch (a shard's last, a one-image search) is padded with zeros

    def __call__(self, images) -> tuple[torch.Tensor, ...]:
        x = self._check(images)
        B = x.shape[0]
        if B >= self.min_batch:
            return self._run(x)
        pad = (B, self.min_batch - B)  # rows are independent (eval-mode BN), so zero rows change nothing
        if isinstance(x, np.ndarray):
            x = np.concatenate([x, np.zeros((pad[1], *x.shape[1:]), x.dtype)])
        else:
            x = torch.cat([x, x.new_zeros((pad[1], *x.shape[1:]))])
        return tuple(o[:B] for o in self._run(x))

    def _run(self, x):
        raise NotImplementedError

    def _check(self, x):
        """Refuse anything but uint8 (B, C, S, S) at the engine's size, with one line naming both."""
        C, S = self.in_channels, self.image_size
        want = f"uint8 (B, {C}, {S}, {S})"
        if isinstance(x, np.ndarray):
            dtype, shape = str(x.dtype), tuple(x.shape)
            ok_dtype = x.dtype == np.uint8
        elif isinstance(x, torch.Tensor):
            dtype, shape = str(x.dtype).replace("torch.", ""), tuple(x.shape)
            ok_dtype = x.dtype == torch.uint8
        else:
            raise DataError(f"{self.name} engine: expected a {want} torch.Tensor or numpy array, got {type(x).__name__}")
        if not ok_dtype or len(shape) != 4 or shape[1:] != (C, S, S) or shape[0] < 1:
            raise DataError(f"{self.name} engine: expected {want} images (NCHW, at the model's size, "
                            f"no resizing is done), got {dtype} {shape}")
        if self.max_batch is not None and shape[0] > self.max_batch:
            raise DataError(f"{self.name} engine: batch {shape[0]} exceeds this engine's max batch {self.max_batch}; "
                            f"split the input or rebuild with a larger --max-batch")
        return x

    def __repr__(self):
        return (f"{type(self).__name__}(name={self.name!r}, device={str(self.device)!r}, provider={self.provider!r}, "
                f"image_size={self.image_size}, in_channels={self.in_channels})")


def _device(device: str | torch.device) -> torch.device:
    """The one 'auto' rule of every engine: this process's GPU (LOCAL_RANK under torchrun), else the CPU."""
    if str(device) == "auto":
        return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: this machine has no CUDA GPU visible to PyTorch; use --device cpu")
    return d


class TorchEngine(Engine):
    """Eager PyTorch from a checkpoint: channels_last, fp16/bf16 autocast on CUDA, optional torch.compile."""

    name = "torch"

    def __init__(self, ckpt, device="auto", precision: str = "auto", compile: bool = False, features: bool = False):
        from mixem.checkpoint import load_model
        from mixem.model import InferenceModel

        self.device = _device(device)
        if precision == "auto":
            # fp16 rather than bf16: 3 more mantissa bits, and inference has no gradient range to protect.
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        if precision not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"precision must be auto, fp32, fp16 or bf16, got {precision!r}")
        if precision != "fp32" and self.device.type != "cuda":
            raise ConfigError(f"precision {precision} needs a CUDA device; on {self.device} use fp32")
        model, cfg = load_model(ckpt, self.device)
        self.image_size, self.in_channels, self.precision = cfg.image_size, cfg.in_channels, precision
        self.outputs = ("embedding", "mixture_probs", "features") if features else ("embedding", "mixture_probs")
        net = InferenceModel(model, features=features).to(self.device).eval()
        # NHWC lets cuDNN and oneDNN pick their fast convolution layouts without a transpose per layer.
        self.net = net.to(memory_format=torch.channels_last)
        if compile:
            self.net = torch.compile(self.net, dynamic=True)
        self.provider = f"{'compiled' if compile else 'eager'}/{precision}"
        self._dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def _run(self, x):
        x = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        amp = torch.autocast(self.device.type, dtype=self._dtype) if self._dtype else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            return tuple(o.float() for o in self.net(x))


class OnnxEngine(Engine):
    """onnxruntime over model.onnx: CUDA provider with I/O binding when onnxruntime-gpu is installed, else CPU."""

    name = "onnx"

    def __init__(self, path, device="auto", threads: int | None = None):
        from .onnx import INPUT, MODEL

        ort = require("onnxruntime", "the onnx engine", "pip install 'mixem-fast[onnx]'")
        p = Path(path)
        p = p / MODEL if p.is_dir() else p
        if not p.is_file():
            raise DataError(f"{p}: no ONNX model here; run `mixem-fast export CKPT --format onnx --out DIR` first")
        has_cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
        if str(device) == "auto" and not has_cuda_ep:
            device = "cpu"  # a GPU without onnxruntime's CUDA provider: onnxruntime runs on the CPU
        self.device = _device(device)
        if self.device.type == "cuda" and not has_cuda_ep:
            raise MissingDependencyError(f"the onnx engine on {self.device} needs onnxruntime's CUDA provider, "
                                         f"which this onnxruntime lacks; install it with: {_ORT_GPU_INSTALL}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or torch.get_num_threads()
        so.log_severity_level = 3  # fp16 graphs on CPU log one cast-insertion warning per node otherwise
        # No busy-waiting between runs: spinning ORT threads steal the cores that decoding (and any torch
        # work in the same process) needs; measured on 2 cores, torch ran ~2x slower right after ORT runs.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if self.device.type == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.sess = ort.InferenceSession(str(p), so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types per failure
            raise DataError(f"{p}: onnxruntime cannot load this model: {str(e).splitlines()[0][:300]}") from None
        self.provider = self.sess.get_providers()[0]
        if self.device.type == "cuda" and self.provider != "CUDAExecutionProvider":
            # ORT falls back to the CPU with only a log line when its CUDA/cuDNN libraries fail to load.
            raise MissingDependencyError(f"onnxruntime could not start its CUDA provider on {self.device} (it fell back "
                                         f"to {self.provider}); check the CUDA and cuDNN libraries onnxruntime-gpu needs")
        inp = self.sess.get_inputs()[0]
        self.input_name = inp.name
        if inp.name != INPUT or len(inp.shape) != 4:
            raise DataError(f"{p}: not a mixem-fast export (input {inp.name!r} {inp.shape}, expected {INPUT!r} (batch, C, S, S))")
        _, self.in_channels, self.image_size, _ = inp.shape
        self.outputs = tuple(o.name for o in self.sess.get_outputs())
        self._widths = [o.shape[1] for o in self.sess.get_outputs()]
        self.path = p

    def _run(self, x):
        if self.provider != "CUDAExecutionProvider":
            x = x.cpu().numpy() if isinstance(x, torch.Tensor) else x
            outs = self.sess.run(None, {self.input_name: np.ascontiguousarray(x)})
            return tuple(torch.from_numpy(o) for o in outs)
        # I/O binding: ORT reads the uint8 batch and writes the outputs straight into torch's CUDA memory.
        x = (torch.from_numpy(x) if isinstance(x, np.ndarray) else x).to(self.device).contiguous()
        B, dev = x.shape[0], self.device.index or 0
        outs = [torch.empty(B, w, dtype=torch.float32, device=self.device) for w in self._widths]
        io = self.sess.io_binding()
        io.bind_input(self.input_name, "cuda", dev, np.uint8, tuple(x.shape), x.data_ptr())
        for name, o in zip(self.outputs, outs):
            io.bind_output(name, "cuda", dev, np.float32, tuple(o.shape), o.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream
        self.sess.run_with_iobinding(io)
        return tuple(outs)


def load_engine(path: str | os.PathLike, engine: str = "torch", device: str | torch.device = "auto", **options) -> Engine:
    """An Engine over `path`: a checkpoint (torch), a .onnx file or export dir (onnx), a .plan or export dir (trt).

    options: torch: precision ("auto"|"fp32"|"fp16"|"bf16"), compile, features; onnx: threads.
    """
    if engine == "torch":
        return TorchEngine(path, device, **options)
    if engine == "onnx":
        return OnnxEngine(path, device, **options)
    if engine == "trt":
        from .tensorrt import TrtEngine

        return TrtEngine(path, device, **options)
    raise ConfigError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
