"""Study: every registered method trained on one dataset under one preset, over seeds, scored side by side.

    mixem-fast bench methods [--set preset=cpu] [--set seeds=0,1,2] [--set jobs=3] [--set methods=mixem,ccp]
                             [--set epochs=N] [--set max_images=N] [--set data=PATH]

Not a timing benchmark: each (method, seed) is one `mixem-fast train --method METHOD --seed SEED` on the same
images with the preset's settings, run as a user runs it (with the `cpu` preset: the two crop candidates, the
choice, the draws of the neighbour stage), and read back from its metrics.json: the kept representation's
k-means on the L2-normalised embedding by the method's own protocol (its registry's headline start) is the
row "METHOD", the refined head's argmax (the train command's headline) the row "METHOD + refinement"
(`--set refine=0`: `--no-refine`, the configured views only), next to raw-pixel k-means. Minutes are
conditions only; `jobs` > 1 runs that many commands at once, one thread each (the candidates of each then
train one after the other).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mixem import methods
from mixem.errors import ConfigError, DataError
from mixem.evaluate import raw_pixel_baseline
from mixem.files import read_json
from mixem.runlog import RunLog
from mixem.session import build_configs, load_data

NAME = "methods"
PARAMS = {
    "preset": "cpu",
    "methods": "",
    "seeds": "0",
    "jobs": 1,
    "epochs": 0,
    "max_images": 0,
    "data": "",
    "refine": 1,  # 0: the representation only
    "refine_epochs": -1,  # -1: the preset's
    "selflabel_epochs": -1,
}
QUICK = {
    "epochs": 1,
    "max_images": 512,
    "refine_epochs": 1,
    "selflabel_epochs": 1,
}  # every method, one seed: a smoke test of the whole study


def run_method(method: str, preset: str, over: dict, seed: int, out: Path, threads: int = 0) -> dict:
    """One `mixem-fast train --method METHOD --seed SEED` (the crop candidates and the draws included, as a user
    runs it), read back from its metrics.json: the kept representation's row by the method's own protocol, and
    the refined head's argmax (the train command's headline) when it refines."""
    from mixem.session import train_command

    if threads:
        torch.set_num_threads(threads)
    run_dir = out / method
    t0 = time.perf_counter()
    train_command(preset, None, {}, {**over, "method": method, "out": str(run_dir), "seed": seed,
                  "threads": threads or None}, resume=False, evaluate=True, quiet=True, json_log=None)  # fmt: skip
    seconds = time.perf_counter() - t0
    metrics = read_json(run_dir / "metrics.json", "metrics file")
    init = methods.get(method).headline_init  # the clustering each method prescribes
    rows = metrics["rows"]
    head = next(r for r in rows if r["features"] == "embedding" and r["init"] == init)
    refined = metrics["headline"] if metrics["headline"].get("stage") else None
    return {
        "headline": head,
        "refined": refined,
        "rows": rows,
        "stages": metrics.get("stages", []),
        "seconds": round(seconds, 1),
        "train_seconds": round(metrics.get("train_minutes", 0.0) * 60, 1),
        "kept_crops": metrics.get("candidates", {}).get("kept"),
        "kept_draw": metrics.get("draws", {}).get("kept"),
        "model": read_json(run_dir / "config.json", "model config"),
        "train": read_json(run_dir / "train_config.json", "train config"),
    }


def _summary(rows: list[dict]) -> dict:
    """Mean and sample std (0 for one seed) of ACC/NMI/ARI over the seeds' headline rows."""
    out = {"features": rows[0]["features"], "init": rows[0]["init"], "n_seeds": len(rows)}
    for x in ("acc", "nmi", "ari"):
        out[x], out[f"{x}_std"] = (
            statistics.fmean(r[x] for r in rows),
            (statistics.stdev(r[x] for r in rows) if len(rows) > 1 else 0.0),
        )
        out[f"{x}_per_seed"] = [r[x] for r in rows]
    return out


def result_stem(params: dict) -> str:
    return f"methods_{params['preset']}"


def _parse(params: dict) -> tuple[list[str], list[int]]:
    chosen = [m.strip() for m in params["methods"].split(",") if m.strip()] or list(methods.REGISTRY)
    bad = [m for m in chosen if m not in methods.REGISTRY]
    if bad:
        raise ConfigError(
            f"--set methods={params['methods']}: choose a comma-separated subset of {', '.join(methods.REGISTRY)}"
        )
    try:
        seeds = sorted({int(x) for x in params["seeds"].split(",") if x.strip()})
    except ValueError:
        seeds = []
    if not seeds:
        raise ConfigError(f"--set seeds={params['seeds']}: give comma-separated integers, e.g. 0,1,2")
    return chosen, seeds


def _train_all(pairs, preset: str, over: dict, jobs: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="mixem-methods-") as tmp:
        if jobs <= 1:
            return {(m, s): run_method(m, preset, over, s, Path(tmp) / str(s)) for m, s in pairs}
        # Spawned processes (a fork would inherit torch's thread pools), one thread each, so `jobs` processes
        # use `jobs` cores.
        with concurrent.futures.ProcessPoolExecutor(
            min(jobs, len(pairs)), mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            futures = {
                (m, s): pool.submit(run_method, m, preset, over, s, Path(tmp) / str(s), threads=1) for m, s in pairs
            }
            return {key: f.result() for key, f in futures.items()}


def study(params: dict, quick: bool, device) -> dict:
    chosen, seeds = _parse(params)
    over = dict(
        epochs=params["epochs"] or None,
        max_images=params["max_images"] or None,
        data=params["data"] or None,
        device=str(device),
        refine=bool(int(params["refine"])),
        refine_epochs=None if int(params["refine_epochs"]) < 0 else int(params["refine_epochs"]),
        selflabel_epochs=None if int(params["selflabel_epochs"]) < 0 else int(params["selflabel_epochs"]),
    )
    model_cfg, train_cfg, preset = build_configs(params["preset"], None, {}, over)
    ds = load_data(train_cfg, model_cfg, RunLog(quiet=True))
    if ds.labels is None:
        raise DataError(f"{ds.source}: no labels, so there is nothing to score the methods against")
    k = len(ds.class_names) if ds.class_names else len(set(ds.labels.tolist()))
    bases = {s: raw_pixel_baseline(ds.images, ds.labels, k, seed=s) for s in seeds}
    runs = _train_all([(m, s) for s in seeds for m in chosen], preset, over, params["jobs"])
    table = [{"method": m, **_summary([runs[(m, s)]["headline"] for s in seeds])} for m in chosen]
    table += [
        {"method": f"{m} + refinement", **_summary([runs[(m, s)]["refined"] for s in seeds])}
        for m in chosen
        if train_cfg.refine
    ]
    table.append({"method": "raw-pixel k-means", **_summary([bases[s] for s in seeds])})
    lines = [
        f"{m} seed {s}: ACC {r['headline']['acc']:.4f}  NMI {r['headline']['nmi']:.4f}  ARI {r['headline']['ari']:.4f}"
        + (
            f"; refined ACC {r['refined']['acc']:.4f}  NMI {r['refined']['nmi']:.4f}"
            + (f" (crops {r['kept_crops']}, {r['kept_draw']})" if r["kept_crops"] else "")
            if r["refined"]
            else ""
        )
        + f"  ({r['seconds']:.0f} s)"
        for (m, s), r in runs.items()
    ]
    lines += [
        f"{r['method']:<18} {r['features'] + ' / ' + r['init']:<20} "
        + " ".join(f"{r[x]:.4f} ± {r[x + '_std']:.4f}" for x in ("acc", "nmi", "ari"))
        for r in table
    ]
    return {
        "preset": preset,
        "seeds": seeds,
        "jobs": params["jobs"],
        "conditions": (
            f"{preset} preset, {train_cfg.epochs} epochs x batch {train_cfg.batch_size}"
            + (
                f" + refinement ({train_cfg.refine_epochs} neighbour + {train_cfg.selflabel_epochs} self-label epochs"
                + (", crop candidates" if train_cfg.candidate_crop_scale is not None else "")
                + (f", {train_cfg.refine_draws} draws" if train_cfg.refine_draws > 1 else "")
                + ")"
                if train_cfg.refine
                else ", no refinement"
            )
            + ", seeds "
            f"{', '.join(map(str, seeds))} (mean and sample std over seeds), {len(ds.images):,} images of "
            f"{ds.source}, k={k}, scored on the training images; {params['jobs']} trainings at a time"
        ),
        "data": {"source": ds.source, "images": len(ds.images), "k": k, "max_images": train_cfg.max_images},
        "table": table,
        "methods": {m: {str(s): runs[(m, s)] for s in seeds} for m in chosen},
        "raw_pixel_kmeans": {str(s): bases[s] for s in seeds},
        "not_measured": [] if len(seeds) > 1 else ["variance over seeds: one seed (--set seeds=0,1,2 gives a spread)"],
        "lines": lines,
    }
