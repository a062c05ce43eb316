"""torchrun integration: the process group from the environment, gathers with gradients, rank-aware helpers.

Gradient convention (the classic world-size pitfall, open_clip#616): every rank computes the *global*
loss terms from gathered tensors, except NT-Xent, where each rank computes only its own rows' share
and multiplies it by W. `gather` sums the incoming gradients over ranks in backward, and DDP averages
parameter gradients over ranks, so both kinds of term end with exactly the gradient that one process
would compute on the concatenated batch.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mixem.errors import ConfigError
from mixem.runtime import torchrun_env


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


SINGLE = DistContext()


def init_from_env(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE > 1), NCCL on GPUs, gloo on CPUs."""
    rank, world, local = torchrun_env()
    if world <= 1:
        return SINGLE, device
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible; "
                "pass --nproc-per-node at most the GPU count"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world), device


def shutdown():
    """Destroy the process group, after freeing what still holds it. A DDP wrapper a stage made and dropped can
    sit in a reference cycle until the cyclic collector runs (one that never stepped does: a finished stage on
    --resume, torch 2.14.1); its reducer holds the group, and destroyed after
    destroy_process_group (at exit) it aborts the process ("terminate called without an active exception",
    SIGABRT). 2-rank gloo scripts whose DDP outlived the group aborted so in 5 of 144 launches on 2 cores, none of
    110 that freed it first. Found while chasing a rank's SIGABRT in CI under torchrun, which it may not explain: a
    probe of that test's first launch found no DDP left at shutdown."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient over ranks and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # all_reduce (unlike reduce_scatter) exists on every backend, gloo included
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate x from all ranks in rank order (equal row counts), differentiably."""
    return _GatherWithGrad.apply(x) if ctx.enabled else x


def mean_over_ranks(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Average logged scalars over ranks (each rank's W-scaled NT-Xent share averages to the global value)."""
    if not ctx.enabled:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / ctx.world for k, v in zip(keys, t)}


def barrier(ctx: DistContext):
    if ctx.enabled:
        dist.barrier()


def local_slice(global_batch: int, ctx: DistContext) -> slice:
    """This rank's rows of a global batch: contiguous, equal, no padding (global batch % W == 0)."""
    if global_batch % ctx.world:
        raise ConfigError(
            f"--batch-size {global_batch} is the global batch and must divide evenly over "
            f"{ctx.world} processes; use a multiple of {ctx.world}"
        )
    b = global_batch // ctx.world
    return slice(ctx.rank * b, (ctx.rank + 1) * b)
