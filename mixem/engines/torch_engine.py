"""The torch engine: eager PyTorch (or torch.compile) over a checkpoint, channels_last, autocast on CUDA."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from mixem.config import ENGINE_PRECISIONS
from mixem.engines.base import Engine
from mixem.errors import ConfigError
from mixem.runtime import resolve_device


class TorchEngine(Engine):
    """Eager PyTorch from a checkpoint: channels_last, fp16/bf16 autocast on CUDA, optional torch.compile."""

    name = "torch"

    def __init__(self, ckpt, device="auto", precision: str = "auto", compile: bool = False, features: bool = False):
        from mixem.checkpoint import CONFIG, WEIGHTS, load_model, resolve
        from mixem.model import InferenceModel

        self.device = resolve_device(device)
        if precision == "auto":
            # fp16 rather than bf16: 3 more mantissa bits, and inference has no gradient range to protect.
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        if precision not in ENGINE_PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(ENGINE_PRECISIONS)}, got {precision!r}")
        if precision != "fp32" and self.device.type != "cuda":
            raise ConfigError(f"precision {precision} needs a CUDA device; on {self.device} use fp32")
        model, cfg = load_model(ckpt, self.device)
        self.path = str(resolve(ckpt))
        self.files = (f"{self.path}/{WEIGHTS}", f"{self.path}/{CONFIG}")
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
