"""The rows a training run is scored by: k-means on its features, the refinement stages, and the headline."""

from __future__ import annotations

from mixem import methods
from mixem.config import MixEMConfig
from mixem.runtime import resolve_device


def n_classes(ds) -> int:
    """Classes in the labels (0 without labels)."""
    if ds.labels is None:
        return 0
    return len(ds.class_names) if ds.class_names else len(set(ds.labels.tolist()))


def num_clusters(ds, model_cfg: MixEMConfig) -> int:
    """k for scoring: the number of classes when labels exist, else K."""
    return n_classes(ds) or model_cfg.components


def score(
    model,
    ds,
    k: int,
    device: str,
    seed: int,
    quick: str | None = None,
    choices: dict | None = None,
    features: dict | None = None,
) -> list[dict]:
    """Rows of evaluate(); quick=METHOD scores only that method's headline clustering (in-training curve).
    features: extract_features of the model on ds.images, where the caller has them."""
    from mixem.evaluate import evaluate, extract_features

    feats = features or extract_features(model, ds.images, device=str(resolve_device(device)))
    if quick:
        init = methods.get(quick).headline_init
        return evaluate(feats, ds.labels, k, seed=seed, inits=(init,), feature_types=("embedding",))
    return evaluate(feats, ds.labels, k, seed=seed, **(choices or {}))


STAGE_NAMES = {"neighbors": "after neighbour consistency", "selflabel": "after self-labelling"}


def representation_stages(rows: list[dict]) -> list[dict]:
    """The stage table's first rows: k-means on the embedding from MIX'EM's start, k-means++, the lower objective."""
    out = []
    for r in rows:
        if r.get("features") == "embedding":
            how = {"mixture": "k-means from the head's groups", "kmeans++": "k-means++"}.get(r["init"], r["init"])
            out.append({**r, "features": "representation", "init": how})
    return out


def argmax_row(model, ds, device, stage: str, probs=None) -> dict:
    """The refined classes as they are served: argmax of the head's probabilities (`probs`, the model's on
    ds.images, where the caller has them)."""
    from mixem.evaluate import extract_features
    from mixem.metrics import clustering_metrics

    probs = probs if probs is not None else extract_features(model, ds.images, device=str(device))["probs"]
    return {"features": STAGE_NAMES.get(stage, stage), "init": "argmax of the head", "stage": stage,
            **clustering_metrics(ds.labels, probs.argmax(1)), "objective": None}  # fmt: skip


def headline_row(rows: list[dict], stages: list[dict], method: str) -> tuple[dict, str]:
    """The row the run ends with, and its name: the last refinement stage's classes when refined, else the
    method's prescribed k-means (or, when eval deselected it, the row shown instead)."""
    m = methods.get(method)
    if stages and stages[-1].get("stage"):
        return stages[-1], f"{m.display} + refinement (argmax of the refined head)"
    head = headline(rows, method)
    if head.get("features") == "embedding" and head.get("init") == m.headline_init:
        return head, m.headline_name
    return head, f"{m.display} ({head.get('features')}, {head.get('init')})"


def headline(rows: list[dict], method: str) -> dict:
    """The method's prescribed clustering (mixem.methods): k-means on the embedding from its headline start."""
    init = methods.get(method).headline_init
    for r in rows:
        if r.get("features") == "embedding" and r.get("init") == init:
            return r
    return rows[0]
