"""The classes a run is scored by, computed at its evaluation and saved beside its checkpoint (mixem.classes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from mixem import classes, methods
from mixem.files import sha256_file
from mixem.kmeans import kmeans, l2_normalize


def matched_names(assign: np.ndarray, labels: np.ndarray, k: int, class_names: list[str] | None) -> list[str]:
    """A label name per class: its Hungarian match (the one ACC scores), else (more classes than labels) its
    majority label."""
    labels = np.asarray(labels, dtype=np.int64)
    L = int(labels.max()) + 1
    C = np.bincount(assign.astype(np.int64) * L + labels, minlength=k * L).reshape(k, L)
    best = C.argmax(1)
    rows, cols = linear_sum_assignment(C, maximize=True)
    best[rows] = cols
    return [class_names[b] if class_names and b < len(class_names) else str(int(b)) for b in best]


def compute(
    features: dict, *, refined: bool, k: int, method: str, seed: int, labels=None, class_names=None
) -> tuple[classes.Classes, np.ndarray]:
    """(the run's classes, each image's class). Refined: the argmax of the head (the headline after
    refinement). Otherwise: the method's headline k-means on the L2-normalised embedding, computed as the
    evaluation computes its row (same start, iterations, restarts and seed), so the classes are that row's."""
    x = l2_normalize(features["embedding"])
    probs = features["probs"]
    if refined:
        K, how = probs.shape[1], "argmax of the refined head"
        a = probs.argmax(1).astype(np.int64)
        centres, by = classes.class_means(x, a, K), "head"
    else:
        m = methods.get(method)
        res = kmeans(x, k, init=m.headline_init, mixture_probs=probs, niter=25, nredo=10, seed=seed)
        K, how, a, centres, by = k, m.headline_name, res.assign, res.centroids, "centroids"
    diff = x - centres[a]
    scale = float(np.einsum("ij,ij->i", diff, diff).mean()) or 1.0
    info = {"method": method, "how": how, "images": int(len(a)), "sizes": np.bincount(a, minlength=K).tolist()}
    names = None
    if labels is not None:
        from mixem.metrics import clustering_metrics

        names = matched_names(a, labels, K, class_names)
        info["scores"] = clustering_metrics(labels, a)
    return classes.Classes(by, K, centres, names, scale, info), a


def write(model, ds, k: int, out_dir: Path, method: str, seed: int, device: str, log, features=None) -> Path:
    """Compute the classes of the checkpoint scored in out_dir (a run's latest, or that checkpoint) on its data,
    and save them beside it; returns the classes.json path. features: extract_features of `model` on ds.images,
    where the caller has them."""
    from mixem import checkpoint as ckpt
    from mixem.evaluate import extract_features
    from mixem.scoring import STAGE_NAMES

    where = ckpt.resolve(out_dir)
    refined = ckpt.read_state(where).get("stage") in STAGE_NAMES
    feats = features or extract_features(model, ds.images, device=device)
    found, _ = compute(
        feats, refined=refined, k=k, method=method, seed=seed, labels=ds.labels, class_names=ds.class_names
    )
    found.info.update(checkpoint=where.name, checkpoint_sha256=sha256_file(where / ckpt.WEIGHTS))
    found.info.update(source=ds.source, seed=seed)
    path = classes.save(where, found)
    log.print(
        f"classes: {found.k}, {found.info['how']} (sizes {min(found.info['sizes'])}..{max(found.info['sizes'])}) -> {path}"
    )
    return path
