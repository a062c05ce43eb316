"""The training loop: data on the device, augmentation on the device, checkpoints every epoch, resume."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mixem import checkpoint as ckpt
from mixem import methods, owner
from mixem.augment import build_augment
from mixem.config import MixEMConfig, TrainConfig
from mixem.distributed import SINGLE, DistContext, barrier, local_slice, mean_over_ranks
from mixem.errors import ConfigError, TrainingDiverged
from mixem.files import save_json
from mixem.model import MixEM, MixEMOutput
from mixem.objectives import detach_terms, objective
from mixem.runlog import RunLog
from mixem.runtime import resolve_device


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    epochs: int  # epochs completed in total (including resumed ones)
    seconds: float  # wall time of this invocation's training epochs
    history: list[dict] = field(default_factory=list)  # one record per epoch of this invocation


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from ~0 to 1, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _epoch_seed(seed: int, epoch: int) -> int:
    # One seed per (run, epoch): shuffling and augmentation of an epoch do not depend on how many
    # epochs ran in this process, which is what makes a resumed run equal an uninterrupted one.
    return seed * 1_000_003 + epoch


def _split(out: MixEMOutput, B: int) -> tuple[MixEMOutput, MixEMOutput]:
    """Two views' outputs; the embedding keeps its autocast dtype (bf16 feeds the fused kernel's tensor
    cores, which accumulate in fp32), the small terms are computed in fp32."""

    def half(sl):
        return MixEMOutput(out.embedding[sl], *(t[sl].float() for t in out[1:]))

    return half(slice(0, B)), half(slice(B, None))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def step(
    fwd_model, views: torch.Tensor, opt, sched, train_cfg: TrainConfig, ctx: DistContext = SINGLE, autocast=None
) -> dict[str, torch.Tensor]:
    """One optimisation step on two views stacked [view 1; view 2] (2B, C, S, S); returns the loss terms.

    A non-finite loss still steps: the caller stops the run, and what is on disk is the last good checkpoint.
    """
    with autocast or nullcontext():
        out = fwd_model(views)
    terms = objective(*_split(out, views.shape[0] // 2), train_cfg, ctx)
    opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    opt.step()
    if sched is not None:
        sched.step()
    return terms


def check_inputs(model_cfg: MixEMConfig, train_cfg: TrainConfig, images: torch.Tensor, ctx: DistContext) -> slice:
    """One-line errors for images, head and batch that do not fit the run; returns this rank's rows of a batch."""
    N, C, H, W = images.shape
    S = model_cfg.image_size
    if (C, H, W) != (model_cfg.in_channels, S, S):
        raise ConfigError(
            f"images are {C}x{H}x{W} but the model expects {model_cfg.in_channels}x{S}x{S}; "
            "reload the data at the model's --image-size/--channels"
        )
    need = methods.get(train_cfg.method).head
    if model_cfg.head != need:
        raise ConfigError(
            f"method {train_cfg.method} needs head {need!r} but the model config has head "
            f"{model_cfg.head!r}; set the model head to {need!r} (--method alone picks its head)"
        )
    mine = local_slice(train_cfg.batch_size, ctx)
    if N < train_cfg.batch_size:
        raise ConfigError(
            f"--batch-size {train_cfg.batch_size} is larger than the {N} training images; pass --batch-size {N} or less"
        )
    return mine


def wrap_for_training(model: MixEM, train_cfg: TrainConfig, ctx: DistContext, device: torch.device):
    """The module the steps call: DDP (with synchronised BatchNorm on GPUs) under torchrun, compiled if asked."""
    fwd_model = model
    if ctx.enabled:
        if device.type == "cuda":  # SimCLR's global BN; SyncBatchNorm has no CPU implementation
            fwd_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        fwd_model = torch.nn.parallel.DistributedDataParallel(
            fwd_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return torch.compile(fwd_model) if train_cfg.compile else fwd_model


def train(
    model_cfg: MixEMConfig,
    train_cfg: TrainConfig,
    images: torch.Tensor,
    *,
    resume: bool = False,
    log: RunLog | None = None,
    on_epoch=None,
    ctx: DistContext = SINGLE,
    device: torch.device | None = None,
) -> tuple[MixEM, TrainResult]:
    """Train on `images` (uint8 (N, C, H, W) at model_cfg.image_size); returns the model and a summary.

    `on_epoch(model, epoch, record)` is called on rank 0 after each epoch's checkpoint (evaluation hooks).
    Under torchrun (`ctx` from mixem.distributed.init_from_env) batch_size is the global batch: each
    rank takes its contiguous share of every step's images, and only rank 0 writes checkpoints.
    """
    log = log or RunLog(quiet=True)
    device = device or resolve_device(train_cfg.device)
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    mine = check_inputs(model_cfg, train_cfg, images, ctx)
    run_dir = Path(train_cfg.out)
    with _own(run_dir, ctx):  # after the checks: a refused run creates nothing (the CLI claims even earlier)
        return _train(model_cfg, train_cfg, images, resume, log, on_epoch, ctx, device, mine, run_dir)


def _own(run_dir: Path, ctx: DistContext):
    return claim_run(run_dir) if ctx.main else nullcontext()


def claim_run(out: str | Path):
    """Own a train run folder (owner.claim): new, empty, or a train run; kept once it holds a checkpoint."""
    return owner.claim(
        out, "train", command="train", legacy=("checkpoints", "train_config.json"), keep=("checkpoints/latest",)
    )


def _train(
    model_cfg, train_cfg, images, resume, log, on_epoch, ctx, device, mine, run_dir
) -> tuple[MixEM, TrainResult]:
    """train() in its owned run folder."""
    steps_per_epoch = len(images) // train_cfg.batch_size  # drop_last, as SimCLR and the released MIX'EM code do
    total_steps = steps_per_epoch * train_cfg.epochs
    warmup_steps = max(1, round(train_cfg.warmup_epochs * steps_per_epoch))

    torch.manual_seed(train_cfg.seed)
    # channels_last: tensor-core friendly on GPUs, and 1.25-1.4x faster training with oneDNN on CPUs (measured).
    model = MixEM(model_cfg).to(device).to(memory_format=torch.channels_last)
    opt = make_optimizer(model, train_cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup_steps, total_steps))
    start_epoch = open_run(run_dir, model_cfg, train_cfg, resume, ctx, log, (model, opt, sched, device))

    fwd_model = wrap_for_training(model, train_cfg, ctx, device)
    augment = build_augment(model_cfg, train_cfg).to(device)
    images = images.to(device)
    use_bf16 = train_cfg.precision == "bf16" or (train_cfg.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    params = sum(p.numel() for p in model.parameters())
    log.event(
        "start",
        device=str(device),
        images=len(images),
        steps_per_epoch=steps_per_epoch,
        start_epoch=start_epoch,
        parameters=params,
        model=model_cfg.__dict__,
        train=train_cfg.__dict__,
    )

    def one_step(x: torch.Tensor) -> dict[str, torch.Tensor]:
        views = torch.cat([augment(x), augment(x)]).contiguous(memory_format=torch.channels_last)  # (2B, C, S, S)
        return step(fwd_model, views, opt, sched, train_cfg, ctx, autocast)

    history, t_train = [], 0.0
    for epoch in range(start_epoch, train_cfg.epochs):
        model.train()
        record = run_epoch(one_step, images, train_cfg, epoch, mine, log, ctx, run_dir)
        record["lr"] = sched.get_last_lr()[0]
        t_train += record["seconds"]
        if ctx.main:
            trainer_state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
            save_epoch(run_dir, model, model_cfg, train_cfg, epoch, record, steps_per_epoch, ctx, trainer_state)
        barrier(ctx)
        log.event("epoch", **record)
        shown = "  ".join(
            f"{k} {v:.4f}" for k, v in record.items() if k not in ("epoch", "lr", "seconds", "images_per_s")
        )
        log.print(f"epoch {epoch + 1:>3}/{train_cfg.epochs}  {shown}  {record['images_per_s']:,.0f} img/s")
        history.append(record)
        if on_epoch is not None and ctx.main:
            on_epoch(model, epoch + 1, record)
    return model, TrainResult(run_dir, ckpt.resolve(run_dir), train_cfg.epochs, t_train, history)


def open_run(
    run_dir: Path, model_cfg: MixEMConfig, train_cfg: TrainConfig, resume: bool, ctx: DistContext, log: RunLog, state
) -> int:
    """Restore the latest checkpoint into state (model, optimizer, scheduler, device) when resuming, or refuse
    a folder that already holds a run; rank 0 writes the configs. Returns the epoch to start from."""
    start_epoch = 0
    if resume and (run_dir / "checkpoints" / "latest").exists():
        start_epoch = _restore(run_dir, *state)
        log.print(f"resuming {run_dir} at epoch {start_epoch + 1}/{train_cfg.epochs}")
    elif resume:
        log.print(f"{run_dir}: killed before its first checkpoint; starting it again from epoch 1")
    elif (run_dir / "checkpoints" / "latest").exists():
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    barrier(ctx)  # every rank has checked the run directory before rank 0 writes into it
    if ctx.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # What a killed run left half-written: checkpoint directories being written or replaced.
        owner.clean_temps(run_dir / "checkpoints")
        owner.clean_temps(run_dir, ("config.json", "train_config.json", "metrics.json"))
        save_json(model_cfg, run_dir / "config.json")
        save_json(train_cfg, run_dir / "train_config.json")
    return start_epoch


def run_epoch(
    one_step,
    images: torch.Tensor,
    train_cfg: TrainConfig,
    epoch: int,
    mine: slice,
    log: RunLog,
    ctx: DistContext,
    run_dir: Path,
) -> dict:
    """One pass over `images` in the epoch's own shuffled order; returns the epoch's record (mean loss terms)."""
    t0 = time.perf_counter()
    N, B = len(images), train_cfg.batch_size
    steps = N // B
    g = torch.Generator().manual_seed(_epoch_seed(train_cfg.seed, epoch))
    perm = torch.randperm(N, generator=g).to(images.device)
    torch.manual_seed(_epoch_seed(train_cfg.seed, epoch))  # kornia draws from the global RNG
    sums: dict[str, float] = {}
    with log.progress(steps * B, f"epoch {epoch + 1}/{train_cfg.epochs}") as bar:
        for s in range(steps):
            vals = mean_over_ranks(detach_terms(one_step(images[perm[s * B : (s + 1) * B][mine]])), ctx)
            if not math.isfinite(vals["loss"]):  # the averaged value: every rank stops together
                raise TrainingDiverged(
                    f"loss became {vals['loss']} at epoch {epoch + 1}, step {s + 1}; "
                    f"{_last_good(run_dir)}; lower --lr or raise --temperature and resume"
                )
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.advance(B, **{k: v for k, v in vals.items() if k in ("loss", "ntxent", "marginal_entropy")})
        rate = bar.rate
    return {
        "epoch": epoch + 1,
        "seconds": round(time.perf_counter() - t0, 3),
        "images_per_s": round(rate, 1),
        **{k: v / steps for k, v in sums.items()},
    }


def _last_good(run_dir: Path) -> str:
    last = run_dir / "checkpoints" / "latest"
    if not last.exists():
        return "no checkpoint was written yet"
    return f"the last good checkpoint is {last.parent / last.read_text().strip()}"


def save_epoch(
    run_dir: Path,
    model,
    model_cfg: MixEMConfig,
    train_cfg: TrainConfig,
    epoch: int,
    record: dict,
    steps_per_epoch: int,
    ctx: DistContext,
    trainer_state: dict,
) -> None:
    """The epoch's checkpoint (atomic), then `latest` points at it; older ones beyond two are pruned."""
    name = f"epoch_{epoch + 1:04d}"
    state = {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, "record": record, "world_size": ctx.world}
    ckpt.save_checkpoint(
        run_dir / "checkpoints" / name, model, model_cfg, train_cfg=train_cfg, state=state, trainer_state=trainer_state
    )
    ckpt.mark_latest(run_dir, name)
    ckpt.prune(run_dir, keep=2)


def _restore(run_dir: Path, model, opt, sched, device) -> int:
    from safetensors.torch import load_file

    path = ckpt.resolve(run_dir)
    model.load_state_dict(load_file(str(path / ckpt.WEIGHTS), device=str(device)))
    state = ckpt.load_trainer_state(path)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return int(ckpt.read_state(path)["epoch"])
