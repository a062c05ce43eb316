"""A run's classes: classes.json says how an image's class follows from the model's outputs; assign() applies it.

`train` (and `eval`) write the contract beside the checkpoint they scored, and `export` copies it beside the
exported model, so `mixem.load(...).predict` and `mixem-fast classify` give every image the class the run
was scored by (the headline):

    classes.json         {"by": "head" | "centroids", "k": K, "names": [...] | null, "scale": s,
                          "checkpoint_sha256": ..., "method": ..., "sizes": [...], ...}
    class_centroids.npy  (K, D) float32: each class's centre in the L2-normalised embedding

"head" (a refined run, whose headline is the argmax of its refined head): class = argmax of the model's class
probabilities, probability = that maximum. "centroids" (a run without refinement, whose headline is k-means
on the embedding): class = nearest centroid (squared L2, as k-means assigns), probability = the Student-t
soft assignment of DEC (Xie et al. 2016) q_k ∝ 1 / (1 + |z - c_k|² / s), with s the mean squared distance of
the run's images to their centre (a relative score, not a calibrated probability). In both, distance = squared
L2 from the unit embedding to its class's centre: the mean embedding of the run's images of that class (NaN
for a class none of them has).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixem.errors import DataError
from mixem.files import atomic_write, atomic_write_text, sha256_file

CLASSES, CLASS_CENTROIDS = "classes.json", "class_centroids.npy"
BY = ("head", "centroids")
BLOCK = 65536  # rows per distance block: (block, K) floats at a time


@dataclass
class Classes:
    """What classes.json says, with its centroids loaded; `where` names the file (or says there is none)."""

    by: str  # "head" | "centroids"
    k: int  # number of classes
    centroids: np.ndarray | None = None  # (k, D) float32; NaN rows for classes no image of the run had
    names: list[str] | None = None  # a name per class (its matched label) when the run had labels
    scale: float = 1.0  # centroids: the Student-t scale s (mean squared distance to the own centre)
    info: dict = field(default_factory=dict)  # the rest of classes.json (method, sizes, scores, ...)
    where: str = ""

    def name(self, c: int) -> str:
        return self.names[c] if self.names and 0 <= c < len(self.names) else str(c)


def head_only(k: int) -> Classes:
    """The classes of a model with no classes.json: the argmax of its head, no centres (distances are NaN)."""
    return Classes("head", k, where="the model's head (no classes.json beside it: `mixem-fast eval` writes one)")


def class_means(x: np.ndarray, assign: np.ndarray, k: int) -> np.ndarray:
    """(k, D) float32 mean of the rows of each class; NaN rows for empty classes."""
    sums = np.zeros((k, x.shape[1]), np.float64)
    np.add.at(sums, assign, x)
    counts = np.bincount(assign, minlength=k)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / counts).astype(np.float32)


def sq_to_centres(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(N, k) float32 squared L2 distances, in blocks of rows (NaN centroids give NaN columns)."""
    c_sq = (centroids * centroids).sum(1)
    out = np.empty((len(x), len(centroids)), np.float32)
    for s in range(0, len(x), BLOCK):
        xb = x[s : s + BLOCK]
        out[s : s + BLOCK] = np.maximum((xb * xb).sum(1, keepdims=True) + c_sq[None] - 2.0 * xb @ centroids.T, 0.0)
    return out


def assign(classes: Classes, embedding: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
    """Classes of rows of unit embeddings (N, D) and head probabilities (N, K): {"class" (N,) int64,
    "probability" (N,) float32, "distance" (N,) float32 (NaN without a centre), "probs" (N, k) float32}."""
    x = np.ascontiguousarray(embedding, dtype=np.float32)
    c = classes.centroids
    if c is not None and c.shape[1] != x.shape[1]:
        raise DataError(
            f"{classes.where}: centroids of {c.shape[1]} dims, but the model gives {x.shape[1]}-dim embeddings: "
            "the classes belong to another model"
        )
    if classes.by == "centroids":
        import faiss

        d2 = sq_to_centres(x, c)
        cls = faiss.knn(x, c, 1)[1][:, 0].astype(np.int64)  # the search k-means assigns its points with
        q = 1.0 / (1.0 + d2 / np.float32(classes.scale))
        soft = (q / q.sum(1, keepdims=True)).astype(np.float32)
        dist = d2[np.arange(len(x)), cls]
    else:
        soft = np.ascontiguousarray(probs, dtype=np.float32)
        if soft.shape[1] != classes.k:
            raise DataError(f"{classes.where}: {classes.k} classes, but the model's head has {soft.shape[1]}")
        cls = soft.argmax(1).astype(np.int64)
        dist = np.full(len(x), np.nan, np.float32)
        if c is not None:
            dist = np.einsum("ij,ij->i", x - c[cls], x - c[cls]).astype(np.float32)
    return {"class": cls, "probability": soft[np.arange(len(x)), cls], "distance": dist, "probs": soft}


def save(folder: str | Path, classes: Classes) -> Path:
    """class_centroids.npy, then classes.json naming it (so the json never names a missing file)."""
    folder = Path(folder)
    doc = {"by": classes.by, "k": int(classes.k), "names": classes.names, "scale": float(classes.scale)}
    if classes.centroids is not None:
        c = np.ascontiguousarray(classes.centroids, dtype=np.float32)

        def write(tmp):
            with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
                np.save(f, c)

        atomic_write(folder / CLASS_CENTROIDS, write)
        doc["centroids"] = CLASS_CENTROIDS
    return atomic_write_text(folder / CLASSES, json.dumps({**doc, **classes.info}, indent=2) + "\n")


def find(model: str | Path) -> Path | None:
    """The folder holding the classes of a model path: its checkpoint (a run's latest), an export folder, or
    the folder of a model.onnx / model.plan / model.safetensors file; None when none holds classes.json."""
    from mixem.checkpoint import resolve
    from mixem.errors import CheckpointError

    p = Path(model)
    candidates = [p.parent] if p.is_file() else [p]
    if p.is_dir():
        try:
            candidates.insert(0, resolve(p))  # a run directory: the checkpoint its `latest` names
        except CheckpointError:
            pass  # an export folder
    return next((c for c in candidates if (c / CLASSES).is_file()), None)


def read(model: str | Path) -> Classes | None:
    """The classes of a model path (see find), checked; None when there are none."""
    where = find(model)
    if where is None:
        return None
    path = where / CLASSES
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        by, k, names, scale = doc.pop("by"), int(doc.pop("k")), doc.pop("names", None), float(doc.pop("scale", 1.0))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(
            f"{path}: not a mixem-fast classes file ({e}); run `mixem-fast eval` on the run again"
        ) from None
    if by not in BY or k < 1 or not scale > 0:
        raise DataError(f"{path}: 'by' {by!r}, k {k}, scale {scale}: not what this version writes; run eval again")
    weights = where / "model.safetensors"
    if weights.is_file() and doc.get("checkpoint_sha256") not in (None, sha256_file(weights)):
        raise DataError(f"{path}: computed for other weights than {weights}; run `mixem-fast eval` on it again")
    centroids = None
    name = doc.pop("centroids", None)
    if name:
        try:
            centroids = np.load(where / name, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as e:
            raise DataError(f"{where / name}: unreadable ({e}); run `mixem-fast eval` on the run again") from None
        if centroids.ndim != 2 or centroids.shape[0] != k:
            raise DataError(f"{where / name}: holds {centroids.shape}, but {CLASSES} says k = {k}; run eval again")
    if by == "centroids" and (centroids is None or not np.isfinite(centroids).all()):
        raise DataError(f"{path}: classes by centroids need finite centroids; run `mixem-fast eval` on the run again")
    if names is not None and (not isinstance(names, list) or len(names) != k):
        raise DataError(f"{path}: 'names' must list {k} names; run `mixem-fast eval` on the run again")
    return Classes(by, k, centroids, names, scale, doc, str(path))
