"""What `train` and `eval` do end to end: configs from preset + overrides, data, training, scored clusters."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import torch

from mixem import checkpoint as ckpt
from mixem import methods, owner, run_classes, scoring
from mixem.config import (
    EVAL_FEATURES,
    EVAL_INITS,
    MixEMConfig,
    TrainConfig,
    apply_model_options,
    from_dict,
    load_json,
    preset,
    replace,
    to_dict,
    with_method_defaults,
    with_min_steps,
)
from mixem.errors import ConfigError
from mixem.files import read_json, save_json
from mixem.runlog import RunLog
from mixem.runtime import resolve_device


def build_configs(
    preset_name: str, config_file: Path | None, model_over: dict, train_over: dict
) -> tuple[MixEMConfig, TrainConfig, str]:
    """preset -> config file -> CLI overrides, each later one winning; returns the resolved preset name too."""
    if preset_name == "auto":
        dev = train_over.get("device") or "auto"
        preset_name = "paper" if (dev.startswith("cuda") or (dev == "auto" and torch.cuda.is_available())) else "cpu"
    model_cfg, train_cfg = preset(preset_name)
    head_given, model_given = False, {k for k, v in model_over.items() if v is not None}
    train_given = {k for k, v in train_over.items() if v is not None}
    if config_file is not None:
        path = Path(config_file)
        data = read_json(path, "--config file")
        if not isinstance(data, dict) or set(data) - {"model", "train"}:
            raise ConfigError(f"--config {path}: expected an object with keys 'model' and/or 'train'")
        model_cfg = from_dict(MixEMConfig, {**to_dict(model_cfg), **data.get("model", {})}, where=f"{path} model")
        head_given = "head" in data.get("model", {})
        model_given |= set(data.get("model", {}))
        train_cfg = from_dict(TrainConfig, {**to_dict(train_cfg), **data.get("train", {})}, where=f"{path} train")
        train_given |= set(data.get("train", {}))
    train_cfg = replace(train_cfg, **train_over)
    # Epochs given (--epochs, a config file, an API override) mean exactly that many: no step floor.
    if "epochs" in train_given and "min_steps" not in train_given:
        train_cfg = replace(train_cfg, min_steps=0)
    if "refine_epochs" in train_given and "refine_min_steps" not in train_given:
        train_cfg = replace(train_cfg, refine_min_steps=0)
    model_cfg, train_cfg = with_method_defaults(preset_name, model_cfg, train_cfg, model_given, train_given)
    if preset_name == "cpu" and not model_given & {"in_channels", "image_size"}:
        model_over = {**_fit_to_data(train_cfg), **{k: v for k, v in model_over.items() if v is not None}}
    model_cfg = apply_model_options(model_cfg, model_over)
    if not head_given:
        # The presets describe the trunk and the run; each method names its head, so --method alone suffices
        # (a head written in a --config file is kept, and training refuses a mismatch in one line).
        model_cfg = replace(model_cfg, head=methods.get(train_cfg.method).head)
    return model_cfg, train_cfg, preset_name


CPU_MAX_SIDE = 32  # the cpu preset's largest input side: its convnet is sized for minutes on 2 cores


def _fit_to_data(train_cfg: TrainConfig) -> dict:
    """The cpu preset's input from the data: colour kept when the images have it, the side of the images
    (their median shorter side) up to CPU_MAX_SIDE. The embedded Fashion-MNIST gives the preset's own 1 x 28."""
    from mixem.data import probe

    channels, side = probe(train_cfg.data, train_cfg.split)
    return {"in_channels": channels, "image_size": max(16, min(side, CPU_MAX_SIDE))}


def load_data(
    train_cfg: TrainConfig,
    model_cfg: MixEMConfig,
    log: RunLog,
    data: str | None = None,
    split: str | None = None,
    max_images: int | None = None,
):
    from mixem.data import load_images

    t0 = time.perf_counter()
    source = data if data is not None else train_cfg.data
    ds = load_images(
        source,
        image_size=model_cfg.image_size,
        in_channels=model_cfg.in_channels,
        split=split or train_cfg.split,
        max_images=max_images if max_images is not None else train_cfg.max_images,
    )
    n_cls = scoring.n_classes(ds)
    log.print(
        f"data: {ds.source}: {len(ds.images):,} images {tuple(ds.images.shape[1:])}"
        + (f", {n_cls} classes" if n_cls else ", no labels")
        + (f", {len(ds.skipped)} unreadable files skipped" if ds.skipped else "")
        + f" ({time.perf_counter() - t0:.1f} s)"
    )
    for path, reason in ds.skipped[:5]:
        log.print(f"  skipped {path}: {reason}")
    log.event("data", source=ds.source, images=len(ds.images), classes=n_cls, skipped=len(ds.skipped))
    return ds


def train_command(
    preset_name: str,
    config_file,
    model_over: dict,
    train_over: dict,
    *,
    resume: bool,
    evaluate: bool,
    quiet: bool,
    json_log,
) -> dict:
    from mixem.distributed import barrier, init_from_env, shutdown

    if resume:
        out = Path(train_over.get("out") or TrainConfig().out)
        model_cfg, saved_train = _saved_configs(out)
        if saved_train is None:
            raise ConfigError(f"{out}: the latest checkpoint has no train_config.json; cannot resume")
        extra = {k: v for k, v in train_over.items() if v is not None and k not in ("out", "epochs", "device")}
        refine_now = extra.get("refine") is True  # --refine: refine a run trained with --no-refine
        if refine_now:
            del extra["refine"]
        if extra or any(v is not None for v in model_over.values()) or config_file:
            raise ConfigError(
                "--resume continues a run with its saved configs; only --out, --epochs, --device and --refine "
                "may be given"
            )
        # The run continues in --out, the folder it was found in: the saved `out` names where it was trained,
        # which a copied or moved run must neither write into nor recreate.
        train_cfg = replace(saved_train, out=str(out), epochs=train_over.get("epochs"), device=train_over.get("device"))
        if refine_now and not train_cfg.refine:  # its own representation, refined: no candidate crops now
            train_cfg = dataclasses.replace(train_cfg, refine=True, candidate_crop_scale=None)
        name = "resumed"
    else:
        model_cfg, train_cfg, name = build_configs(preset_name, config_file, model_over, train_over)
        if train_over.get("out") is None:  # no --out: never collide with an earlier run, take the next free name
            train_cfg = replace(train_cfg, out=str(_fresh_run_dir(Path(train_cfg.out))))
    if train_cfg.candidate_crop_scale is not None:
        from mixem import candidates
        from mixem.training import claim_run

        why_not = candidates.skip_reason(train_cfg)
        if why_not is None:
            with claim_run(train_cfg.out):
                again = [f"--{k}={train_over[k]}" for k in ("epochs", "device") if resume and train_over.get(k)]
                from mixem.distributed import SINGLE

                def refine_in_out(final: TrainConfig) -> dict:  # the kept representation's neighbour stage, in OUT
                    return _train_and_report(model_cfg, final, name, SINGLE, resolve_device(final.device), resume=True,
                                             evaluate=evaluate, quiet=quiet, json_log=json_log)  # fmt: skip

                return candidates.train_and_choose(
                    model_cfg, train_cfg, name, resume=resume, evaluate=evaluate, quiet=quiet, json_log=json_log,
                    resume_args=again, refine_in_out=refine_in_out,
                )  # fmt: skip
        one = "; one neighbour stage (its draws run with the candidates)" if train_cfg.refine_draws > 1 else ""
        RunLog(None, quiet=quiet).print(f"candidate crops: not chosen, {why_not}; training the configured views{one}")
    ctx, device = init_from_env(resolve_device(train_cfg.device))
    try:
        # Rank 0 owns --out before anything (the log included) is written: a run refused by its checks leaves none.
        from mixem.training import claim_run

        with claim_run(train_cfg.out) if ctx.main else contextlib.nullcontext():
            summary = _train_and_report(model_cfg, train_cfg, name, ctx, device, resume=resume, evaluate=evaluate,
                                        quiet=quiet, json_log=json_log)  # fmt: skip
        barrier(ctx)  # ranks wait for rank 0's evaluation; none tears the group down under another
        return summary
    finally:
        shutdown()


def _saved_configs(out: Path) -> tuple[MixEMConfig, TrainConfig | None]:
    """The configs to resume with: the latest checkpoint's, or, for a run killed before its first checkpoint,
    the ones it saved at the start (it then starts again from the first epoch)."""
    if not (out / "checkpoints" / "latest").exists() and (out / "train_config.json").is_file():
        return load_json(MixEMConfig, out / "config.json"), load_json(TrainConfig, out / "train_config.json")
    _, model_cfg, saved_train = ckpt.load_configs(out)
    return model_cfg, saved_train


def _train_and_report(model_cfg, train_cfg, name, ctx, device, *, resume, evaluate, quiet, json_log) -> dict:
    from mixem.training import train, uses_bf16

    log = RunLog(json_log or Path(train_cfg.out) / "log.jsonl", quiet=quiet, enabled=ctx.main)
    if ctx.enabled:
        log.print(f"torchrun: {ctx.world} processes ({device.type}), global batch {train_cfg.batch_size}")
    log.print(
        f"mixem-fast train: preset {name}, {model_cfg.backbone} {model_cfg.in_channels}x{model_cfg.image_size}px, "
        f"K={model_cfg.components}, method {train_cfg.method}, {train_cfg.epochs} epochs x batch {train_cfg.batch_size} "
        f"-> {train_cfg.out}\ndevice {device}, {'bf16 autocast' if uses_bf16(train_cfg, device) else 'fp32'} "
        f"(precision {train_cfg.precision})"
    )
    ds = load_data(train_cfg, model_cfg, log)
    fitted = with_min_steps(train_cfg, len(ds.images))
    if fitted != train_cfg:
        log.print(
            f"small data: {fitted.epochs} epochs (at least {train_cfg.min_steps} steps of {train_cfg.batch_size})"
            + (f", neighbour stage {fitted.refine_epochs} epochs" if fitted.refine and fitted.refine_epochs else "")
            + " (--epochs / --refine-epochs set them exactly)"
        )
        train_cfg = fitted
    k = scoring.num_clusters(ds, model_cfg)
    t0 = time.perf_counter()
    curve, trained = [], {"s": 0.0}  # training seconds so far: the curve's clock excludes its own evaluations

    def on_epoch(model, epoch, record):
        trained["s"] += record["seconds"]
        if (
            train_cfg.eval_every
            and epoch % train_cfg.eval_every == 0
            and epoch < train_cfg.epochs
            and ds.labels is not None
        ):
            row = scoring.headline(
                scoring.score(model, ds, k, str(device), seed=train_cfg.seed, quick=train_cfg.method), train_cfg.method
            )
            point = {"epoch": epoch, "train_minutes": round(trained["s"] / 60, 3), **row}
            curve.append(point)
            log.event("eval", **point)
            log.print(f"  eval epoch {epoch}: ACC {row['acc']:.3f} NMI {row['nmi']:.3f} ARI {row['ari']:.3f}")

    model, result = train(
        model_cfg, train_cfg, ds.images, resume=resume, log=log, on_epoch=on_epoch, ctx=ctx, device=device
    )
    scored = evaluate and ctx.main and ds.labels is not None
    rows, stages, feats = None, [], {}
    if train_cfg.refine:
        rows, stages, feats = _refine(
            model, ds, k, model_cfg, train_cfg, log, ctx, device, resume=resume, scored=scored
        )
        result.checkpoint = ckpt.resolve(Path(train_cfg.out))
    summary = {"run_dir": str(result.run_dir), "checkpoint": str(result.checkpoint), "epochs": result.epochs,
               "train_seconds": round(result.seconds, 1), "preset": name}  # fmt: skip
    if evaluate and ctx.main:
        summary.update(_evaluate_and_report(
            model, ds, k, str(device), train_cfg.seed, result.run_dir, log, method=train_cfg.method,
            minutes=(time.perf_counter() - t0) / 60, curve=curve, train_minutes=result.seconds / 60, rows=rows,
            stages=stages, features=feats or None))  # fmt: skip
    if ctx.main:  # the run's own page: loss terms and ACC/NMI against epochs (mixem.report_train)
        from mixem.report_train import write_train_report

        summary["report_html"] = str(write_train_report(result.run_dir, json_log))
    return summary


def _refine(model, ds, k, model_cfg, train_cfg, log, ctx, device, *, resume, scored) -> tuple[list | None, list, dict]:
    """Refine the trained model in place; when `scored`, also the stage table: the representation's k-means rows
    (before refinement changes the model) and each stage's argmax row. Returns (rows, stages, the refined model's
    features when scored, else {}): each model's features are extracted once, and refinement's start reads the same."""
    from mixem.evaluate import extract_features
    from mixem.feature_cache import representation_features
    from mixem.refine import refine

    rows, stages, feats, representation = None, [], {}, None
    if scored:  # kept in the representation's checkpoint by a candidate run, or extracted (mixem.feature_cache)
        keep = train_cfg.keep_features and ctx.main
        representation = representation_features(model, ds.images, Path(train_cfg.out), str(device), keep=keep)
        rows = scoring.score(model, ds, k, str(device), seed=train_cfg.seed, features=representation)
        stages = scoring.representation_stages(rows)

    def on_stage(name, m):
        feats.clear()  # this stage changed the model
        if scored:
            feats.update(extract_features(m, ds.images, device=str(device)))
            stages.append(scoring.argmax_row(m, ds, device, name, probs=feats["probs"]))
            log.print(f"  after {name}: ACC {stages[-1]['acc']:.3f} NMI {stages[-1]['nmi']:.3f}")

    refine(model, ds.images, model_cfg, train_cfg, run_dir=Path(train_cfg.out), log=log, device=device, ctx=ctx,
           resume=resume, labels=ds.labels, on_stage=on_stage, features=representation)  # fmt: skip
    return rows, stages, feats


def _fresh_run_dir(out: Path) -> Path:
    """out, or the first of out-2, out-3, ... that is free: missing, empty, or a train run with no checkpoint yet."""

    def free(d: Path) -> bool:
        return not d.exists() or (d.is_dir() and not (d / "checkpoints" / "latest").exists()
                                  and not owner.foreign_entries(d, "train", ("checkpoints", "train_config.json")))  # fmt: skip

    n = 2
    candidate = out
    while not free(candidate):
        candidate = out.with_name(f"{out.name}-{n}")
        n += 1
    return candidate


def eval_command(
    checkpoint_path,
    data,
    *,
    k,
    split,
    max_images,
    device,
    seed,
    quiet,
    json_log,
    feature_types=EVAL_FEATURES,
    inits=EVAL_INITS,
    normalize=True,
) -> dict:
    from mixem.evaluate import extract_features

    dev = resolve_device(device or "auto")
    model, model_cfg = ckpt.load_model(checkpoint_path, device=dev)
    _, _, train_cfg = ckpt.load_configs(checkpoint_path)
    train_cfg = train_cfg or TrainConfig()
    log = RunLog(json_log, quiet=quiet)
    if k is not None and k < 1:
        raise ConfigError(f"--k must be >= 1, got {k}")
    ds = load_data(train_cfg, model_cfg, log, data=data, split=split, max_images=max_images)
    k = k or scoring.num_clusters(ds, model_cfg)
    out_dir = ckpt.resolve(checkpoint_path)
    stage = ckpt.read_state(out_dir).get("stage", "epoch")
    # A refined checkpoint's answer is its head's argmax, unless the user asked for a particular clustering.
    default_choice = tuple(feature_types) == EVAL_FEATURES and tuple(inits) == EVAL_INITS
    refined = stage in scoring.STAGE_NAMES and ds.labels is not None and default_choice
    feats = extract_features(model, ds.images, device=str(dev))  # once: the rows, the stage row and the classes
    stages = [scoring.argmax_row(model, ds, dev, stage, probs=feats["probs"])] if refined else []
    return _evaluate_and_report(
        model,
        ds,
        k,
        str(dev),
        seed,
        out_dir,
        log,
        method=train_cfg.method,
        choices=dict(feature_types=feature_types, inits=inits, normalize=normalize),
        stages=stages,
        features=feats,
    )


def _evaluate_and_report(
    model,
    ds,
    k,
    device,
    seed,
    out_dir: Path,
    log: RunLog,
    method: str,
    minutes: float | None = None,
    curve: list | None = None,
    train_minutes: float | None = None,
    choices: dict | None = None,
    rows: list[dict] | None = None,
    stages: list[dict] | None = None,
    features: dict | None = None,
) -> dict:
    """Score `model` on `ds` (the rows unless given), print and save metrics.json and the classes; `features`:
    extract_features of `model` on ds.images where the caller has them."""
    from mixem.evaluate import extract_features, format_table, headline_line, raw_pixel_baseline

    features = features or extract_features(model, ds.images, device=device)
    if ds.labels is None:
        log.print("no labels: nothing to score; the run's classes are saved for `predict` and `classify`")
        return {"classes_json": str(run_classes.write(model, ds, k, out_dir, method, seed, device, log, features))}
    rows = rows if rows is not None else scoring.score(model, ds, k, device, seed, choices=choices, features=features)
    base = raw_pixel_baseline(ds.images, ds.labels, k, seed=seed)
    stages = stages or []
    head, name = scoring.headline_row(rows, stages, method)
    headline = {"method": method, "name": name, **head}
    metrics = {
        "k": k,
        "images": len(ds.images),
        "source": ds.source,
        "rows": rows,
        "raw_pixel_kmeans": base,
        "headline": headline,
        "stages": stages,
        "curve": curve or [],
        "minutes": round(minutes, 3) if minutes is not None else None,
        "train_minutes": round(train_minutes, 3) if train_minutes is not None else None,
    }
    save_json(metrics, Path(out_dir) / "metrics.json")
    log.event("metrics", **metrics)
    log.print(format_table(rows + [base]))
    if stages:
        log.print("\nwhat each stage adds:\n" + format_table(stages))
    print(headline_line(metrics))
    saved = run_classes.write(model, ds, k, out_dir, method, seed, device, log, features)
    return {"headline": headline, "raw_pixel_kmeans": base, "metrics_json": str(Path(out_dir) / "metrics.json"),
            "classes_json": str(saved)}  # fmt: skip
