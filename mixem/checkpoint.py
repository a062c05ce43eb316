"""Checkpoints: safetensors weights + JSON configs, written atomically, loaded without running code.

A checkpoint is a directory:
    model.safetensors   model weights (MixEM state_dict)
    config.json         MixEMConfig (what rebuilds the model)
    train_config.json   TrainConfig of the run (optional)
    state.json          epoch, step, metrics (written by training)
    trainer.pt          optimizer / scheduler / RNG state, tensors only (torch.load(weights_only=True))
A run directory holds checkpoints/STAGE_NNNN/ (epoch_ for the representation, then neighbors_ and
selflabel_ for the refinement stages) and a `latest` file naming the newest complete one;
each checkpoint is written to a hidden temporary directory first and renamed into place, so a
killed run never leaves a half-written checkpoint that looks complete.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from mixem.config import MixEMConfig, TrainConfig, load_json
from mixem.errors import CheckpointError, ConfigError
from mixem.files import atomic_write_text, read_json, save_json

WEIGHTS, CONFIG, TRAIN_CONFIG, STATE, TRAINER = (
    "model.safetensors",
    "config.json",
    "train_config.json",
    "state.json",
    "trainer.pt",
)
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".bin", ".tar")


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    model_cfg: MixEMConfig,
    *,
    train_cfg: TrainConfig | None = None,
    state: dict | None = None,
    trainer_state: dict | None = None,
) -> Path:
    """Write a complete checkpoint directory at `path` atomically (temp dir + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in _unwrap(model).state_dict().items()}
    save_file(weights, str(tmp / WEIGHTS))
    save_json(model_cfg, tmp / CONFIG)
    if train_cfg is not None:
        save_json(train_cfg, tmp / TRAIN_CONFIG)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER)
    save_json(state or {}, tmp / STATE)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if path.exists():
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return path


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


STAGE_NAME = r"(epoch|neighbors|selflabel)_\d{4,}"  # the stages' checkpoint folders (training.Stage prefixes)


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a checkpoint dir, a run dir (its latest), or the weights file."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(
            f"{p}: checkpoint not found; pass a run directory (e.g. runs/mixem) or a checkpoint directory"
        )
    if p.is_file():
        if p.name == WEIGHTS:
            return p.parent
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise CheckpointError(
                f"{p}: pickle checkpoints are refused (loading them can run arbitrary code); "
                f"mixem-fast reads a directory with {WEIGHTS} + {CONFIG}"
            )
        raise CheckpointError(f"{p}: not a checkpoint; pass a directory holding {WEIGHTS} and {CONFIG}")
    if (p / WEIGHTS).is_file():
        return p
    latest = p / "checkpoints" / "latest"
    if latest.is_file():
        name = latest.read_text(encoding="utf-8", errors="replace").strip()
        if not re.fullmatch(STAGE_NAME, name):
            raise CheckpointError(
                f"{latest}: names {name[:60]!r}, not a checkpoint (damaged or edited by hand); write the name of "
                f"the newest checkpoints/STAGE_NNNN folder (epoch_, neighbors_ or selflabel_) into it"
            )
        c = p / "checkpoints" / name
        if (c / WEIGHTS).is_file():
            return c
    raise CheckpointError(f"{p}: no {WEIGHTS} here and no checkpoints/latest; is this a mixem-fast run directory?")


def load_configs(path: str | os.PathLike) -> tuple[Path, MixEMConfig, TrainConfig | None]:
    ckpt = resolve(path)
    if not (ckpt / CONFIG).is_file():
        raise CheckpointError(f"{ckpt}: {CONFIG} is missing; the checkpoint is incomplete")
    model_cfg = load_json(MixEMConfig, ckpt / CONFIG)
    train_cfg = load_json(TrainConfig, ckpt / TRAIN_CONFIG) if (ckpt / TRAIN_CONFIG).is_file() else None
    return ckpt, model_cfg, train_cfg


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild MixEM from config.json and load model.safetensors; returns (model in eval mode, MixEMConfig)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mixem.model import MixEM

    ckpt, model_cfg, _ = load_configs(path)
    model = MixEM(model_cfg)
    try:
        weights = load_file(str(ckpt / WEIGHTS), device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{ckpt / WEIGHTS}: unreadable safetensors file ({e})") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt / WEIGHTS}: weights do not match {CONFIG} (missing {len(missing)}, unexpected {len(unexpected)} keys, "
            f"e.g. {(missing or unexpected)[0]})"
        )
    return model.to(device).eval(), model_cfg


def load_trainer_state(path: str | os.PathLike) -> dict:
    """Optimizer/scheduler/RNG state: tensors and plain containers only (weights_only=True)."""
    ckpt = resolve(path)
    f = ckpt / TRAINER
    if not f.is_file():
        raise CheckpointError(f"{ckpt}: {TRAINER} is missing; this checkpoint cannot resume training")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError for anything but tensors and containers
        raise CheckpointError(f"{f}: refused to load ({type(e).__name__}); only tensor state is accepted") from None


def read_state(path: str | os.PathLike) -> dict:
    ckpt = resolve(path)
    f = ckpt / STATE
    if not f.is_file():
        return {}
    try:
        state = read_json(f, "state file")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(state, dict) or not isinstance(state.get("epoch", 0), int) or state.get("epoch", 0) < 0:
        raise CheckpointError(f"{f}: not a checkpoint state (damaged or edited by hand); resume from an older epoch")
    return state


def mark_latest(run_dir: str | os.PathLike, name: str):
    atomic_write_text(Path(run_dir) / "checkpoints" / "latest", name + "\n")


def _stage_checkpoints(run_dir: str | os.PathLike, prefix: str) -> list[Path]:
    """A stage's complete checkpoints (PREFIX_NNNN with weights), oldest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted(d for d in root.glob(f"{prefix}_[0-9]*") if (d / WEIGHTS).is_file())


def newest(run_dir: str | os.PathLike, prefix: str) -> Path | None:
    """The newest complete checkpoint of one stage ("epoch", "neighbors", "selflabel"), or None."""
    found = _stage_checkpoints(run_dir, prefix)
    return found[-1] if found else None


def prune(run_dir: str | os.PathLike, prefix: str = "epoch", keep: int = 2):
    """Delete all but one stage's newest `keep` checkpoints (the latest is always among them)."""
    for d in _stage_checkpoints(run_dir, prefix)[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
