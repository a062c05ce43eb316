"""Two (or more) draws of the neighbour stage, the one with the lower neighbour objective kept (README "Two draws
of the neighbour stage").

From one representation and one set of neighbours, the neighbour stage ends in one of two outcomes on
Fashion-MNIST: seed 0's quickstart representation gave 0.61 to 0.73 ACC as only the stage's seed changed (the low
one splits sandals, sneakers and bags over three classes). The stage's own objective, evaluated on the
un-augmented images after training, tells them apart without labels (docs/experiments.md "Two draws of the
neighbour stage"). With `refine_draws` N > 1 the kept representation (OUT's epoch checkpoints and neighbours, see
mixem.candidates) is copied into OUT/draws/draw-<i>, whose neighbour stages run with seeds seed + i (on a CPU at
the same time, the cores shared out), each is scored by RULE and the lowest is kept: its neighbour-stage
checkpoints go into OUT, `latest` written last, and OUT's resumed run evaluates them. No label is looked at.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from mixem import checkpoint as ckpt
from mixem.children import Child, freed_core, run_all
from mixem.config import MixEMConfig, TrainConfig, replace
from mixem.feature_cache import copy_checkpoint
from mixem.files import atomic_write_text, save_json
from mixem.runlog import RunLog

RULE = (
    "the lowest neighbour objective on the un-augmented images: mean -log(p_i . p_j) over each image i and its "
    "neighbours j, minus the entropy of the mean class probabilities"
)


class Draw(Child):  # train: its own run, out = OUT/draws/<name>, one draw, its own seed
    @property
    def seed(self) -> int:
        return self.train.seed


def draws(final: TrainConfig, threads: int) -> list[Draw]:
    """The draws of OUT's run `final`: seeds final.seed + i, `threads` each, one stage apiece."""
    out = Path(final.out) / "draws"
    one = {"threads": threads, "refine_draws": 1}
    return [
        Draw(f"draw-{i}", replace(final, out=str(out / f"draw-{i}"), seed=final.seed + i, **one))
        for i in range(final.refine_draws)
    ]


def objective(probs: np.ndarray, neighbors: np.ndarray, rows: int = 65536) -> tuple[float, float]:
    """(consistency, entropy) of class probabilities (N, K) with neighbours (N, k): the mean of -log(p_i . p_j)
    over every (image, neighbour) pair, and the entropy of the mean class probabilities (nats). The neighbour
    objective is consistency - entropy: a draw that puts everything in one class is consistent but not kept."""
    p = np.asarray(probs, dtype=np.float64)
    total = 0.0
    for s in range(0, len(p), rows):  # (rows, k, K) at a time: bounded memory on millions of images
        dot = np.einsum("nk,njk->nj", p[s : s + rows], p[neighbors[s : s + rows]])
        total += float(-np.log(np.clip(dot, 1e-7, None)).sum())
    mean = p.mean(0)
    return total / neighbors.size, float(-(mean * np.log(np.clip(mean, 1e-12, None))).sum())


def prepare(d: Draw, out: Path, model_cfg: MixEMConfig) -> None:
    """d's folder: OUT's representation (its newest epoch checkpoint) and neighbours with d's config; the config
    file written last, so a folder without it (killed while being made) is made again."""
    from mixem.refine import NEIGHBORS

    if (d.dir / "train_config.json").is_file():
        return  # made before: the child continues it
    shutil.rmtree(d.dir, ignore_errors=True)
    last = ckpt.newest(out, "epoch")
    copy_checkpoint(last, d.dir / "checkpoints" / last.name)  # with its features, if kept (mixem.feature_cache)
    save_json(d.train, d.dir / "checkpoints" / last.name / "train_config.json")
    shutil.copyfile(out / NEIGHBORS, d.dir / NEIGHBORS)
    save_json(model_cfg, d.dir / "config.json")
    atomic_write_text(d.dir / "checkpoints" / "latest", last.name + "\n")
    save_json(d.train, d.dir / "train_config.json")


def score_one(d: Draw, images, device, neighbors: np.ndarray) -> dict:
    """A finished draw's neighbour objective on the un-augmented images (label-free)."""
    from mixem.evaluate import extract_features

    model, _ = ckpt.load_model(d.dir, device=device)
    cons, ent = objective(extract_features(model, images, device=str(device))["probs"], neighbors)
    return {"name": d.name, "seed": d.seed, "objective": round(cons - ent, 5), "consistency": round(cons, 5),
            "entropy": round(ent, 5)}  # fmt: skip


def score(found: list[Draw], images, device, neighbors: np.ndarray, done: dict | None = None) -> list[dict]:
    """Each draw's score_one; done: those already scored (by name)."""
    return [(done or {}).get(d.name) or score_one(d, images, device, neighbors) for d in found]


def promote(kept: Draw, out: Path, final: TrainConfig) -> None:
    """OUT gets the kept draw's neighbour-stage checkpoints (train config `final`), `latest` last; OUT's epoch
    checkpoints, the representation both started from, stay."""
    for d in sorted((out / "checkpoints").glob("neighbors_[0-9]*")):
        shutil.rmtree(d)
    for d in sorted((kept.dir / "checkpoints").glob("neighbors_[0-9]*")):
        shutil.copytree(d, out / "checkpoints" / d.name)
        save_json(final, out / "checkpoints" / d.name / "train_config.json")
    atomic_write_text(out / "checkpoints" / "latest", ckpt.newest(kept.dir, "neighbors").name + "\n")


def draw_and_keep(out: Path, final: TrainConfig, model_cfg: MixEMConfig, images, device, *, parallel: bool,
                  cores: int, preset: str, log: RunLog) -> dict:  # fmt: skip
    """The draws of OUT's run, trained (at the same time when `parallel`), scored, the lowest promoted into OUT;
    returns the record (also OUT/draws.json). OUT holds the representation and neighbours, no `latest` yet."""
    from mixem.refine import NEIGHBORS

    found = draws(final, max(1, cores // final.refine_draws) if parallel else final.threads)
    how = f"at the same time, {found[0].train.threads} thread(s) each" if parallel else "one after the other"
    log.print(f"neighbour stage: {len(found)} draws (seeds {', '.join(str(d.seed) for d in found)}) {how} "
              f"-> {out / 'draws'}; the lowest neighbour objective is kept")  # fmt: skip
    for d in found:
        prepare(d, out, model_cfg)
    neighbors, done = np.load(out / NEIGHBORS, allow_pickle=False), {}
    on_done = freed_core(lambda d: score_one(d, images, device, neighbors), done, cores)  # a draw that ends first
    run_all(found, model_cfg, preset, parallel=parallel, log=log, on_done=on_done)
    scores = score(found, images, device, neighbors, done)
    best = min(range(len(found)), key=lambda i: (scores[i]["objective"], i))
    record = {"rule": RULE, "kept": found[best].name, "draws": scores}
    save_json(record, out / "draws.json")
    log.event("draw_kept", **record)
    each = ", ".join(f"{s['name']} {s['objective']:.4f} (consistency {s['consistency']:.4f})" for s in scores)
    log.print(f"neighbour stage kept: {found[best].name} (seed {found[best].seed}), the lowest objective of {each}")
    promote(found[best], out, final)
    return record
