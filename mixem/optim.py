"""The optimiser and its learning-rate schedule, built lazily (a finished stage needs neither)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from mixem.config import TrainConfig


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from ~0 to 1, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def make_optimizer(params, lr: float, cfg: TrainConfig, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW (or Adam), fused where torch has the kernel for the parameters' device (the CPU and CUDA in torch 2.14):
    one update of all tensors instead of a loop over them: the cpu preset's step of 256 images at two threads
    121.0 -> 112.5 ms (README "Training step"); the same update to fp32 rounding (tests/mixem/test_train.py)."""
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    params = list(params)
    if fused:
        try:
            return cls(params, lr=lr, weight_decay=cfg.weight_decay, fused=True)
        except RuntimeError:  # a device (or torch) without the fused kernel: the loop over tensors
            pass
    return cls(params, lr=lr, weight_decay=cfg.weight_decay)


def lazy_trainer(optimizer: Callable, schedule: Callable) -> Callable[[], tuple]:
    """() -> (optimizer, scheduler), built on the first call and the same pair after: a stage that a resumed run
    finds finished restores its weights without building one (torch's optimizer imports torch._dynamo on
    construction: about a second of the final run's tail on the CPU)."""

    @functools.cache
    def pair():
        opt = optimizer()
        return opt, schedule(opt)

    return pair


def make_schedule(opt, warmup_steps: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup_steps, total_steps))
