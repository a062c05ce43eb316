"""The onnx engine: onnxruntime over a mixem-fast model.onnx (CUDA provider with I/O binding, else the CPU).

The graph's contract (written by mixem.export.onnx, read here):
    input  `images`        uint8   (batch, C, S, S), S = the model's image size, no resize
    output `embedding`     float32 (batch, D)  L2-normalised embedding
    output `mixture_probs` float32 (batch, K)  class (mixture) probabilities
    output `features`      float32 (batch, F)  backbone features (only when exported with features)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mixem.engines.base import Engine
from mixem.errors import DataError, MissingDependencyError, require
from mixem.runtime import resolve_device

MODEL = "model.onnx"
INPUT = "images"
OUTPUTS = ("embedding", "mixture_probs", "features")
ONNX_INSTALL = "pip install 'mixem-fast[onnx]'  (onnx, onnxruntime, onnxscript)"
_ORT_GPU_INSTALL = "pip install onnxruntime-gpu  (replaces the CPU-only onnxruntime)"


class OnnxEngine(Engine):
    """onnxruntime over model.onnx: CUDA provider with I/O binding when onnxruntime-gpu is installed, else CPU."""

    name = "onnx"

    def __init__(self, path, device="auto", threads: int | None = None):
        ort = require("onnxruntime", "the onnx engine", ONNX_INSTALL)
        p = Path(path)
        p = p / MODEL if p.is_dir() else p
        if not p.is_file():
            raise DataError(f"{p}: no ONNX model here; run `mixem-fast export CKPT --format onnx --out DIR` first")
        has_cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
        if str(device) == "auto" and not has_cuda_ep:
            device = "cpu"  # a GPU without onnxruntime's CUDA provider: onnxruntime runs on the CPU
        self.device = resolve_device(device)
        if self.device.type == "cuda" and not has_cuda_ep:
            raise MissingDependencyError(
                f"the onnx engine on {self.device} needs onnxruntime's CUDA provider, "
                f"which this onnxruntime lacks; install it with: {_ORT_GPU_INSTALL}"
            )
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
            raise MissingDependencyError(
                f"onnxruntime could not start its CUDA provider on {self.device} (it fell back "
                f"to {self.provider}); check the CUDA and cuDNN libraries onnxruntime-gpu needs"
            )
        inp = self.sess.get_inputs()[0]
        self.input_name = inp.name
        if inp.name != INPUT or len(inp.shape) != 4:
            raise DataError(
                f"{p}: not a mixem-fast export (input {inp.name!r} {inp.shape}, expected {INPUT!r} (batch, C, S, S))"
            )
        _, self.in_channels, self.image_size, _ = inp.shape
        self.outputs = tuple(o.name for o in self.sess.get_outputs())
        self._widths = [o.shape[1] for o in self.sess.get_outputs()]
        self.path = p
        self.files = (str(p),)

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
