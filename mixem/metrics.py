"""Clustering metrics against ground-truth labels: ACC (Hungarian matching), NMI and ARI."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from mixem.errors import DataError


def _labels(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if y_true.size == 0:
        raise DataError("cannot score a clustering of zero points: the label array is empty")
    if y_true.shape != y_pred.shape:
        raise DataError(
            f"labels and cluster assignments differ in length ({y_true.size} vs {y_pred.size}): "
            "pass one label per clustered point, in the same order"
        )
    return y_true, y_pred


def contingency(y_true, y_pred) -> np.ndarray:
    """(clusters, classes) counts of points in each (cluster, class) pair; any hashable label values."""
    y_true, y_pred = _labels(y_true, y_pred)
    _, t = np.unique(y_true, return_inverse=True)
    _, p = np.unique(y_pred, return_inverse=True)
    C = np.zeros((p.max() + 1, t.max() + 1), dtype=np.int64)
    np.add.at(C, (p, t), 1)
    return C


def cluster_accuracy(y_true, y_pred) -> float:
    """Best one-to-one cluster->class matching (Hungarian on the contingency matrix), as a fraction.

    With more clusters than classes the unmatched clusters' points count as errors; with fewer, the
    unmatched classes do. Same as the released code's `munkres` with cost = -|intersection|.
    """
    C = contingency(y_true, y_pred)
    rows, cols = linear_sum_assignment(C, maximize=True)  # rectangular: min(#clusters, #classes) pairs
    return float(C[rows, cols].sum() / C.sum())


def nmi(y_true, y_pred) -> float:
    """Normalised mutual information, arithmetic-mean normalisation (scikit-learn's default, as released)."""
    y_true, y_pred = _labels(y_true, y_pred)
    return float(normalized_mutual_info_score(y_true, y_pred, average_method="arithmetic"))


def ari(y_true, y_pred) -> float:
    """Adjusted Rand index (0 for chance, 1 for identical partitions)."""
    y_true, y_pred = _labels(y_true, y_pred)
    return float(adjusted_rand_score(y_true, y_pred))


def clustering_metrics(y_true, y_pred) -> dict[str, float]:
    """{"acc", "nmi", "ari"} for one clustering."""
    return {"acc": cluster_accuracy(y_true, y_pred), "nmi": nmi(y_true, y_pred), "ari": ari(y_true, y_pred)}
