"""Choosing the crops without labels: one run per candidate crop range, kept by the other's neighbours.

Which crops suit a dataset's classes depends on the data: with stop 27's preset, both views at 80-100 %
ended 0.07 ACC above the preset's views on Fashion-MNIST and below raw pixels on scikit-learn's digits (README
"Choosing the crops"; with the current preset the two lie close on both).
With `candidate_crop_scale` set (the `cpu` preset sets 80-100 %), `train` makes two runs in OUT/candidates/: the
configured views, and both views at candidate_crop_scale, each a representation and a neighbour stage of half
the final one's epochs (enough to score it). On a CPU they run at the same time with half the threads each
(1.38x the throughput of one after the other on 2 cores, README), elsewhere one after the other. Each
candidate's refined classes (the argmax of its head) are then scored by cross-agreement: how often an image and
one of the neighbours the *other* candidate mined share a class. A candidate's own neighbours are what its
neighbour stage was trained to agree with, so they flatter it; the other's it never saw. The configured views are
the default: the other replaces them only when its score is higher by CHOICE_Z standard errors of the paired
per-image difference (a near tie is noise, and on Fashion-MNIST one kept the crops whose stage ended in the low
outcome: README "Choosing the crops without labels"). OUT gets the kept one's representation (checkpoints,
configs), and the full neighbour stage runs there on the neighbours that both candidates' lists share
(shared_neighbors: purer than either list; README "Choosing the crops without labels"). OUT is then a run like
any other (eval, export, classify, --resume).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixem import checkpoint as ckpt
from mixem.children import Child, freed_core, run_all
from mixem.config import TrainConfig, replace
from mixem.errors import ConfigError
from mixem.feature_cache import copy_checkpoint
from mixem.files import atomic_write, atomic_write_text, read_json, save_json, save_npy
from mixem.runlog import RunLog

RULE = (
    "cross-agreement: the share of (image, neighbour mined by the other candidate) pairs put in one class; the "
    "configured views are kept unless another candidate's is higher by CHOICE_Z standard errors of the paired "
    "per-image difference"
)
CHOICE_Z = 2.0  # how many standard errors another candidate's cross-agreement must lie above the configured views'
CHOICE_SHARE = 0.5  # a candidate's neighbour stage: this share of the final one's epochs and step floor


@dataclass
class Candidate(Child):  # train: its own run, out = OUT/candidates/<name>, no candidates of its own
    crops: str = ""  # for people: "35-100 % and 80-100 %"


def skip_reason(train_cfg: TrainConfig) -> str | None:
    """Why a run with candidate_crop_scale trains only its configured views (None: it trains both)."""
    if not train_cfg.refine or not train_cfg.refine_epochs:
        return "the choice scores refined classes, and there is no neighbour stage (--no-refine, or 0 epochs)"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "under torchrun every process trains one run"
    return None


def _pct(scale) -> str:
    return f"{round(scale[0] * 100)}-{round(scale[1] * 100)} %"


def _views(first, second) -> tuple[str, str]:
    """(folder name, words) of a pair of crop ranges."""
    if second is None or tuple(second) == tuple(first):
        return f"crops-{_pct(first)[:-2]}", f"both views {_pct(first)}"
    return f"crops-{_pct(first)[:-2]}_{_pct(second)[:-2]}", f"{_pct(first)} and {_pct(second)}"


def candidates(train_cfg: TrainConfig, threads: int) -> list[Candidate]:
    """The configured views first, then both views at candidate_crop_scale; each an ordinary run's config, its
    neighbour stage CHOICE_SHARE of the configured one."""
    out = Path(train_cfg.out) / "candidates"
    pairs = [(train_cfg.crop_scale, train_cfg.second_crop_scale), (train_cfg.candidate_crop_scale, None)]
    found = []
    for first, second in pairs:
        name, words = _views(first, second)
        cfg = replace(train_cfg, out=str(out / name), crop_scale=tuple(first), threads=threads, refine_draws=1,
                      keep_features=True,
                      refine_epochs=math.ceil(train_cfg.refine_epochs * CHOICE_SHARE),
                      refine_min_steps=math.ceil(train_cfg.refine_min_steps * CHOICE_SHARE))  # fmt: skip
        cfg.second_crop_scale, cfg.candidate_crop_scale = second, None  # replace() reads None as "keep"
        found.append(Candidate(name, cfg, crops=words))
    if found[0].name == found[1].name:
        raise ConfigError(f"candidate_crop_scale {list(train_cfg.candidate_crop_scale)} repeats the configured "
                            "views; set another range, or null to train the configured views only")  # fmt: skip
    return found


def agreement(classes: np.ndarray, neighbors: np.ndarray) -> float:
    """The share of (image, neighbour) pairs whose classes are the same; neighbors: (N, k) row indices."""
    return float((classes[neighbors] == classes[:, None]).mean())


def cross_per_image(classes: list[np.ndarray], neighbors: list[np.ndarray]) -> list[np.ndarray]:
    """(N,) for each partition: each image's share of the *other* candidates' neighbours in its class (the mean
    over the others)."""
    n = len(classes)
    return [np.mean([(classes[i][neighbors[j]] == classes[i][:, None]).mean(1) for j in range(n) if j != i], 0)
            for i in range(n)]  # fmt: skip


def z_over_first(per_image: list[np.ndarray]) -> list[float]:
    """How far each candidate's cross-agreement lies above the first's (the configured views), in standard errors
    of the mean paired per-image difference (images taken as independent; ±inf where every image differs alike)."""
    out = []
    for x in per_image:
        u = x - per_image[0]
        se = float(u.std(ddof=1) / math.sqrt(len(u))) if len(u) > 1 else 0.0
        d = float(u.mean())
        out.append(d / se if se > 0 else (0.0 if d == 0 else math.copysign(math.inf, d)))
    return out


def choose(scores: list[dict]) -> int:
    """The kept candidate: the configured views (0), unless another's cross-agreement lies CHOICE_Z or more standard
    errors above theirs (then the highest such)."""
    wins = [i for i in range(1, len(scores)) if scores[i]["z_over_configured"] >= CHOICE_Z]
    return max(wins, key=lambda i: (scores[i]["cross_agreement"], -i)) if wins else 0


def scored_alone(c: Candidate, images, device, k_neighbors: int, labels=None) -> dict:
    """What a finished candidate is scored on by itself: its refined classes on `images` (the argmax of its head),
    its first k_neighbors neighbours and, with `labels`, its ACC and NMI (for the record)."""
    from mixem.evaluate import extract_features
    from mixem.metrics import clustering_metrics

    model, _ = ckpt.load_model(c.dir, device=device)
    classes = extract_features(model, images, device=str(device))["probs"].argmax(1)
    alone = {"classes": classes, "neighbors": np.load(c.dir / "neighbors.npy")[:, :k_neighbors]}
    if labels is not None:
        m = clustering_metrics(labels, classes)
        alone.update(acc=round(m["acc"], 4), nmi=round(m["nmi"], 4))
    return alone


def score(cands: list[Candidate], images, device, k_neighbors: int, labels=None, alone: dict | None = None
          ) -> list[dict]:  # fmt: skip
    """Each candidate's own and cross agreement; with `labels`, also its ACC and NMI, for the record (the choice
    never reads them). alone: scored_alone of the candidates already scored (by name; the others are scored here)."""
    own = [(alone or {}).get(c.name) or scored_alone(c, images, device, k_neighbors, labels) for c in cands]
    classes, nbs = [o["classes"] for o in own], [o["neighbors"] for o in own]
    per_image = cross_per_image(classes, nbs)
    z = [max(-1e3, min(1e3, v)) for v in z_over_first(per_image)]  # the record's JSON holds no inf
    return [{"name": c.name, "crops": c.crops, "crop_scale": list(c.train.crop_scale),
             "second_crop_scale": list(c.train.second_crop_scale) if c.train.second_crop_scale else None,
             "cross_agreement": round(float(x.mean()), 4), "z_over_configured": round(zi, 2),
             "own_agreement": round(agreement(cl, nb), 4), **{k: o[k] for k in ("acc", "nmi") if k in o}}
            for c, x, zi, cl, nb, o in zip(cands, per_image, z, classes, nbs, own)]  # fmt: skip


def shared_neighbors(lists: list[np.ndarray]) -> np.ndarray:
    """(N, k): each image's neighbours that every (N, k) list holds, in the first list's order, repeated in turn
    to fill k places (so the neighbour stage draws each about equally often). An image whose lists share none
    gets each list's nearest, in turn."""
    first = lists[0]
    k = first.shape[1]
    held = np.ones(first.shape, bool)
    for other in lists[1:]:
        held &= (first[:, :, None] == other[:, None, :]).any(2)
    count = held.sum(1)
    ranked = np.take_along_axis(first, np.argsort(~held, axis=1, kind="stable"), 1)  # the shared ones first
    out = np.take_along_axis(ranked, np.arange(k)[None, :] % np.maximum(count, 1)[:, None], 1)
    none = count == 0
    nearest = np.stack([nb[none, 0] for nb in lists], 1)  # (images sharing none, lists)
    out[none] = np.tile(nearest, (1, k // len(lists) + 1))[:, :k]
    return out


def promote(kept: Candidate, others: list[Candidate], out: Path, final: TrainConfig, *, commit: bool = True
            ) -> np.ndarray:  # fmt: skip
    """Make OUT the kept candidate's representation, ready for the full neighbour stage: the neighbours its list
    shares with the others' (OUT/neighbors.npy, which the stage reads), its epoch checkpoints and model config
    with `final` as their train config, the `latest` pointer written last when `commit` (a run killed before it
    has none, and --resume chooses again; once it exists OUT resumes as a run of its own). Without `commit` the
    draws (mixem.draws) write `latest`. OUT's train_config.json stays the one that chooses until OUT's own run
    writes `final` there. Returns the shared neighbours."""
    from mixem.refine import NEIGHBORS

    (out / "checkpoints" / "latest").unlink(missing_ok=True)
    shared = shared_neighbors([np.load(c.dir / NEIGHBORS, allow_pickle=False) for c in [kept, *others]])
    save_npy(out / NEIGHBORS, shared)
    for d in sorted((out / "checkpoints").glob("*_[0-9]*")):  # an earlier choice's, if any
        shutil.rmtree(d, ignore_errors=True)
    for d in sorted((kept.dir / "checkpoints").glob("epoch_[0-9]*")):
        copy_checkpoint(d, out / "checkpoints" / d.name)  # with the representation's features (mixem.feature_cache)
        save_json(final, out / "checkpoints" / d.name / "train_config.json")
    atomic_write(out / "config.json", lambda tmp: shutil.copyfile(kept.dir / "config.json", tmp))
    if commit:
        atomic_write_text(out / "checkpoints" / "latest", ckpt.newest(kept.dir, "epoch").name + "\n")
    return shared


def _print_choice(kept: Candidate, scores: list[dict], best: int, log: RunLog) -> None:
    other = scores[1 - best]
    log.print(f"crops kept: {kept.crops} ({kept.name}): its classes agree with {scores[best]['cross_agreement']:.1%} "
              f"of the other candidate's neighbours, the other's {other['cross_agreement']:.1%} "
              f"(own neighbours {scores[best]['own_agreement']:.1%} / {other['own_agreement']:.1%})")  # fmt: skip
    z = scores[1]["z_over_configured"]
    log.print(f"  {scores[1]['crops']} against the configured views: {z:+.2f} standard errors of the per-image "
              f"difference ({'at or above' if z >= CHOICE_Z else 'below'} the {CHOICE_Z:g} that replaces them)")  # fmt: skip
    if all("acc" in sc for sc in scores):
        log.print("the candidates against the labels (not used to choose): "
                  + ", ".join(f"{sc['name']} ACC {sc['acc']:.3f} NMI {sc['nmi']:.3f}" for sc in scores))  # fmt: skip


def adopt_log(run: Path, log_path: Path, events: tuple[str, ...]) -> None:
    """Append a child run's `events` records to OUT's log (the kept candidate's start and representation epochs,
    the kept draw's neighbour-stage epochs), so OUT's report shows them (a record written twice, after a resume,
    counts once there)."""
    import json

    from mixem.report_train import read_log

    mine = [e for e in read_log(run / "log.jsonl") if e.get("event") in events and (e["event"] != "neighbors"
            or "epoch" in e)]  # fmt: skip
    with open(log_path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(e) + "\n" for e in mine)


def _final_config(kept: Candidate, train_cfg: TrainConfig) -> TrainConfig:
    """OUT's run: the kept candidate's (its crops, its epochs fitted to the data) with OUT's threads and the
    configured neighbour stage in full."""
    from mixem.config import load_json

    saved = load_json(TrainConfig, kept.dir / "train_config.json")
    return replace(saved, out=train_cfg.out, threads=train_cfg.threads, refine_epochs=train_cfg.refine_epochs,
                   refine_min_steps=train_cfg.refine_min_steps, refine_draws=train_cfg.refine_draws,
                   keep_features=train_cfg.keep_features)  # fmt: skip


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def train_and_choose(
    model_cfg, train_cfg: TrainConfig, preset: str, *, resume, evaluate, quiet, json_log, refine_in_out, resume_args=()
) -> dict:
    """`train` with candidate crops, in its claimed OUT: both candidates, the choice, the kept one promoted.
    refine_in_out(final config): resumes OUT, the promoted representation, through its neighbour stage and
    evaluation and returns the run's summary (the session's own training path).
    resume_args: the options `train --resume` was given (--epochs N, --device D), passed on to both candidates."""
    from mixem.data import load_images
    from mixem.runtime import resolve_device
    from mixem.training import clean_killed_writes

    out = Path(train_cfg.out)
    if not resume and (
        (out / "checkpoints" / "latest").exists() or any((out / "candidates").glob("*/train_config.json"))
    ):
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    t0 = time.perf_counter()
    # a killed run's half-written files in OUT (promote's too)
    clean_killed_writes(out, ("candidates.json", "draws.json"))
    log = RunLog(json_log or out / "log.jsonl", quiet=quiet)
    save_json(model_cfg, out / "config.json")
    save_json(train_cfg, out / "train_config.json")
    device = resolve_device(train_cfg.device)
    cores = train_cfg.threads or _cores()
    parallel = device.type == "cpu" and cores >= 2
    cands = candidates(train_cfg, max(1, cores // 2) if parallel else train_cfg.threads)
    how = f"at the same time, {cands[0].train.threads} thread(s) each" if parallel else "one after the other"
    log.print(f"mixem-fast train: preset {preset}, method {train_cfg.method}, choosing the crops without labels: "
              f"{cands[0].crops} or {cands[1].crops}, two whole runs {how} -> {out / 'candidates'}")  # fmt: skip
    log.event("candidates", names=[c.name for c in cands], parallel=parallel, threads=cands[0].train.threads)
    # The candidates train without scoring themselves (no k-means tables, raw pixels, classes files: the quickstart
    # reached the choice about 10 s sooner, stop 41); their classes' ACC and NMI are computed here, for the record.
    ds = load_images(train_cfg.data, image_size=model_cfg.image_size, in_channels=model_cfg.in_channels,
                     split=train_cfg.split, max_images=train_cfg.max_images, labels=evaluate)  # fmt: skip
    alone: dict = {}  # a candidate that ends first is scored on the core it frees, while the other trains
    on_done = freed_core(lambda c: scored_alone(c, ds.images, device, train_cfg.refine_neighbors, ds.labels), alone,
                         cores)  # fmt: skip
    run_all(cands, model_cfg, preset, parallel=parallel, log=log, resume_args=resume_args, on_done=on_done)
    scores = score(cands, ds.images, device, train_cfg.refine_neighbors, labels=ds.labels, alone=alone)
    best = choose(scores)
    kept = cands[best]
    record = {"rule": RULE, "kept": kept.name, "candidates": scores}
    save_json(record, out / "candidates.json")
    log.event("crops_chosen", **record)
    _print_choice(kept, scores, best, log)
    final = _final_config(kept, train_cfg)
    draws = final.refine_draws > 1
    shared = promote(kept, [c for c in cands if c is not kept], out, final, commit=not draws)
    distinct = float(np.mean([len(np.unique(row)) for row in shared]))
    log.print(f"shared neighbours: {distinct:.1f} of each image's {shared.shape[1]} nearest in {kept.name}'s "
              f"representation are also among the other's; the neighbour stage trains on those, in {out}")  # fmt: skip
    log.event("shared_neighbors", k=int(shared.shape[1]), distinct=round(distinct, 3))
    adopt_log(kept.dir, Path(json_log or out / "log.jsonl"), ("start", "epoch"))
    drawn = {}
    if draws:  # the full neighbour stage drawn refine_draws times, the lowest objective's checkpoints in OUT
        from mixem import draws as drawing

        drawn = {"draws": drawing.draw_and_keep(out, final, model_cfg, ds.images, device, parallel=parallel,
                                                cores=cores, preset=preset, log=log)}  # fmt: skip
        adopt_log(out / "draws" / drawn["draws"]["kept"], Path(json_log or out / "log.jsonl"), ("neighbors",))
    summary = refine_in_out(final)
    record["minutes"] = round((time.perf_counter() - t0) / 60, 3)
    save_json(record, out / "candidates.json")
    if (out / "metrics.json").is_file():
        metrics = read_json(out / "metrics.json", "metrics file")
        save_json({**metrics, "minutes": record["minutes"], "candidates": record, **drawn}, out / "metrics.json")
    return {**summary, "candidates": record, **drawn}
