"""The training loop: on-device data and augmentation, checkpoints every epoch, resume (mixem.train is the API)."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mixem import checkpoint as ckpt
from mixem import methods, owner
from mixem.augment import build_views
from mixem.classes import CLASS_CENTROIDS, CLASSES
from mixem.config import MixEMConfig, TrainConfig
from mixem.distributed import SINGLE, DistContext, barrier, local_slice, mean_over_ranks
from mixem.errors import ConfigError, TrainingDiverged
from mixem.feature_cache import FILE as FEATURES
from mixem.files import save_json
from mixem.model import MixEM, MixEMOutput
from mixem.objectives import detach_terms, objective
from mixem.optim import lazy_trainer, make_optimizer, make_schedule
from mixem.runlog import RunLog
from mixem.runtime import native_bf16, resolve_device


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    epochs: int  # epochs completed in total (including resumed ones)
    seconds: float  # wall time of this invocation's training epochs
    history: list[dict] = field(default_factory=list)  # one record per epoch of this invocation


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


def check_inputs(model_cfg: MixEMConfig, train_cfg: TrainConfig, images: torch.Tensor, ctx: DistContext) -> None:
    """One-line errors for images, head and batch that do not fit the run."""
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
    local_slice(train_cfg.batch_size, ctx)  # the global batch must divide over the processes
    if N < train_cfg.batch_size:
        raise ConfigError(
            f"--batch-size {train_cfg.batch_size} is larger than the {N} training images; pass --batch-size {N} or less"
        )


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


@dataclass(frozen=True)
class Stage:
    """One training stage. Its checkpoints are PREFIX_NNNN in the run's checkpoints/ (the newest two kept), it
    resumes from its own newest one, and its epochs draw their own shuffles and augmentations."""

    prefix: str  # "epoch" (representation), "neighbors", "selflabel"
    epochs: int
    batch_size: int
    seed: int  # the run's seed; each stage offsets it by its index so stages never share a permutation
    index: int = 0


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
    check_inputs(model_cfg, train_cfg, images, ctx)
    run_dir = Path(train_cfg.out)
    with _own(run_dir, ctx):  # after the checks: a refused run creates nothing (the CLI claims even earlier)
        return _train(model_cfg, train_cfg, images, resume, log, on_epoch, ctx, device, run_dir)


def _own(run_dir: Path, ctx: DistContext):
    return claim_run(run_dir) if ctx.main else nullcontext()


def claim_run(out: str | Path):
    """Own a train run folder (owner.claim): new, empty, or a train run; kept once it holds a checkpoint."""
    return owner.claim(
        out, "train", command="train", legacy=("checkpoints", "train_config.json"), keep=("checkpoints/latest",)
    )


def _train(model_cfg, train_cfg, images, resume, log, on_epoch, ctx, device, run_dir) -> tuple[MixEM, TrainResult]:
    """train() in its owned run folder."""
    stage = Stage("epoch", train_cfg.epochs, train_cfg.batch_size, train_cfg.seed)
    steps_per_epoch = len(images) // stage.batch_size  # drop_last, as SimCLR and the released MIX'EM code do
    warmup_steps = max(1, round(train_cfg.warmup_epochs * steps_per_epoch))

    torch.manual_seed(train_cfg.seed)
    # channels_last: tensor-core friendly on GPUs, and 1.25-1.4x faster training with oneDNN on CPUs (measured).
    model = MixEM(model_cfg).to(device).to(memory_format=torch.channels_last)
    trainer = lazy_trainer(
        lambda: make_optimizer(model.parameters(), train_cfg.lr, train_cfg),
        lambda opt: make_schedule(opt, warmup_steps, steps_per_epoch * stage.epochs),
    )
    open_run(run_dir, model_cfg, train_cfg, resume, ctx)

    fwd_model = wrap_for_training(model, train_cfg, ctx, device)
    two_views = build_views(model_cfg, train_cfg).to(device)
    images = images.to(device)
    autocast = autocast_for(train_cfg, device)
    params = sum(p.numel() for p in model.parameters())
    log.event(
        "start",
        device=str(device),
        images=len(images),
        steps_per_epoch=steps_per_epoch,
        parameters=params,
        model=model_cfg.__dict__,
        train=train_cfg.__dict__,
    )

    def one_step(idx: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images[idx]
        views = two_views(x).contiguous(memory_format=torch.channels_last)  # (2B, C, S, S)
        return step(fwd_model, views, *trainer(), train_cfg, ctx, autocast)

    history, seconds = run_stage(
        stage,
        model,
        trainer,
        one_step,
        len(images),
        model_cfg,
        train_cfg,
        run_dir=run_dir,
        log=log,
        ctx=ctx,
        resume=resume,
        on_epoch=on_epoch,
    )
    return model, TrainResult(run_dir, ckpt.resolve(run_dir), train_cfg.epochs, seconds, history)


def uses_bf16(train_cfg: TrainConfig, device: torch.device) -> bool:
    """precision "auto": bf16 autocast where the device computes bf16 natively (runtime.native_bf16)."""
    return train_cfg.precision == "bf16" or (train_cfg.precision == "auto" and native_bf16(device))


def autocast_for(train_cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(train_cfg, device) else nullcontext()


def run_stage(
    stage: Stage,
    model,
    trainer,
    one_step,
    n_images: int,
    model_cfg: MixEMConfig,
    train_cfg: TrainConfig,
    *,
    run_dir: Path,
    log: RunLog,
    ctx: DistContext,
    resume: bool,
    on_epoch=None,
) -> tuple[list, float]:
    """The epochs of one stage: one_step(indices) per batch, a checkpoint per epoch (rank 0), resumable.

    trainer: () -> (optimizer, scheduler) (lazy_trainer); with resume, both and the model are restored from the
    stage's newest checkpoint and the stage continues after it (a finished stage restores the model alone and
    builds no optimizer). Returns (records, seconds).
    """
    start = restore_stage(run_dir, stage.prefix, model, trainer, stage.epochs) if resume else 0
    if start:
        log.print(f"resuming {run_dir}: {stage.prefix} {start}/{stage.epochs} done")
    mine = local_slice(stage.batch_size, ctx)
    history, seconds = [], 0.0
    for epoch in range(start, stage.epochs):
        model.train()
        record = run_epoch(one_step, n_images, stage, epoch, mine, log, ctx, run_dir)
        opt, sched = trainer()
        record["lr"] = sched.get_last_lr()[0]
        seconds += record["seconds"]
        if ctx.main:
            trainer_state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
            state = {
                "stage": stage.prefix,
                "epoch": epoch + 1,
                "step": (epoch + 1) * (n_images // stage.batch_size),
                "record": record,
                "world_size": ctx.world,
            }
            save_epoch(run_dir, f"{stage.prefix}_{epoch + 1:04d}", model, model_cfg, train_cfg, state, trainer_state)
        barrier(ctx)
        log.event(stage.prefix, **record)
        shown = "  ".join(
            f"{k} {v:.4f}" for k, v in record.items() if k not in ("epoch", "lr", "seconds", "images_per_s")
        )
        log.print(f"{stage.prefix} {epoch + 1:>3}/{stage.epochs}  {shown}  {record['images_per_s']:,.0f} img/s")
        history.append(record)
        if on_epoch is not None and ctx.main:
            on_epoch(model, epoch + 1, record)
    return history, seconds


# The files a run writes atomically into its folder (refine's mined neighbours among them): a killed run's
# half-written copies of these are removed when the run is opened again.
RUN_FILES = ("config.json", "train_config.json", "metrics.json", "report.html", "neighbors.npy")
# and what evaluation later writes into a finished checkpoint's folder (its scores, its classes)
CHECKPOINT_EXTRAS = ("metrics.json", CLASSES, CLASS_CENTROIDS, FEATURES)


def clean_killed_writes(run_dir: Path, extra: tuple[str, ...] = ()) -> None:
    """Remove what a killed run left half-written in run_dir (its owner only): checkpoint directories being written
    or replaced, the run's files (RUN_FILES + extra), and evaluation files inside finished checkpoints."""
    owner.clean_temps(run_dir / "checkpoints")
    owner.clean_temps(run_dir, RUN_FILES + extra)
    for d in (run_dir / "checkpoints").glob("[!.]*"):
        owner.clean_temps(d, CHECKPOINT_EXTRAS)


def open_run(run_dir: Path, model_cfg: MixEMConfig, train_cfg: TrainConfig, resume: bool, ctx: DistContext) -> None:
    """Refuse a folder that already holds a run unless resuming it; rank 0 writes the configs."""
    if not resume and (run_dir / "checkpoints" / "latest").exists():
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    barrier(ctx)  # every rank has checked the run directory before rank 0 writes into it
    if ctx.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_killed_writes(run_dir)
        save_json(model_cfg, run_dir / "config.json")
        save_json(train_cfg, run_dir / "train_config.json")


def run_epoch(
    one_step, n_images: int, stage: Stage, epoch: int, mine: slice, log: RunLog, ctx: DistContext, run_dir: Path
) -> dict:
    """One pass over the images in the epoch's own shuffled order; returns the epoch's record (mean loss terms)."""
    t0 = time.perf_counter()
    B = stage.batch_size
    steps = n_images // B
    seed = _epoch_seed(stage.seed, epoch + 100_000 * stage.index)
    perm = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)  # kornia (and the stages' own draws) use the global RNG
    sums: dict[str, float] = {}
    with log.progress(steps * B, f"{stage.prefix} {epoch + 1}/{stage.epochs}") as bar:
        for s in range(steps):
            vals = mean_over_ranks(detach_terms(one_step(perm[s * B : (s + 1) * B][mine])), ctx)
            if not math.isfinite(vals["loss"]):  # the averaged value: every rank stops together
                raise TrainingDiverged(
                    f"loss became {vals['loss']} in {stage.prefix} {epoch + 1}, step {s + 1}; "
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
    run_dir: Path, name: str, model, model_cfg: MixEMConfig, train_cfg: TrainConfig, state: dict, trainer_state: dict
) -> None:
    """The epoch's checkpoint (atomic), then `latest` points at it; the stage's older ones beyond two are pruned."""
    ckpt.save_checkpoint(
        run_dir / "checkpoints" / name, model, model_cfg, train_cfg=train_cfg, state=state, trainer_state=trainer_state
    )
    ckpt.mark_latest(run_dir, name)
    ckpt.prune(run_dir, prefix=name.rsplit("_", 1)[0], keep=2)


def restore_stage(run_dir: Path, prefix: str, model, trainer, epochs: int) -> int:
    """Load the stage's newest checkpoint into model and trainer() (optimizer, scheduler), the latter only if the
    stage has epochs left of its `epochs`; the epochs it had done (0: none)."""
    from safetensors.torch import load_file

    path = ckpt.newest(run_dir, prefix)
    if path is None:
        return 0
    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(path / ckpt.WEIGHTS), device=str(device)))
    done = int(ckpt.read_state(path)["epoch"])
    if done < epochs:
        opt, sched = trainer()
        state = ckpt.load_trainer_state(path)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    return done
