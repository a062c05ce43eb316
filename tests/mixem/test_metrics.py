"""ACC/NMI/ARI on hand-computed cases, invariance to cluster relabelling, and input validation."""

import math

import numpy as np
import pytest

from mixem.errors import DataError
from mixem.metrics import ari, cluster_accuracy, clustering_metrics, contingency, nmi


def test_accuracy_hand_case():
    # Clusters 1->class 0 (2 right), 0->class 1 (2 right, 1 class-2 point wrong), 2->class 2 (1 right).
    assert cluster_accuracy([0, 0, 1, 1, 2, 2], [1, 1, 0, 0, 2, 0]) == pytest.approx(5 / 6)


def test_accuracy_more_clusters_than_classes():
    # 4 clusters, 2 classes: only clusters 0 and 2 can be matched; clusters 1 and 3 are errors.
    assert cluster_accuracy([0, 0, 0, 1, 1, 1], [0, 0, 1, 2, 2, 3]) == pytest.approx(4 / 6)


def test_accuracy_fewer_clusters_than_classes():
    assert cluster_accuracy([0, 0, 1, 1, 2, 2], [5, 5, 5, 5, 7, 7]) == pytest.approx(4 / 6)
    assert cluster_accuracy([0, 1, 2, 3], [0, 0, 0, 0]) == pytest.approx(1 / 4)


def test_nmi_hand_case():
    # H(T) = ln2, H(P) = 1.5 ln2, P determines T so I = ln2; NMI = ln2 / ((ln2 + 1.5 ln2) / 2) = 0.8.
    assert nmi([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(0.8)
    assert nmi([0, 0, 1, 1], [3, 3, 9, 9]) == pytest.approx(1.0)


def test_ari_hand_case():
    # sum C(n_ij,2) = 1, sum C(a_i,2) = 2, sum C(b_j,2) = 1, C(4,2) = 6: expected 1/3, max 1.5,
    # ARI = (1 - 1/3) / (1.5 - 1/3) = 4/7.
    assert ari([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)


def test_contingency_counts():
    C = contingency(["a", "a", "b"], [2, 0, 0])  # rows: clusters 0, 2; columns: classes a, b
    np.testing.assert_array_equal(C, [[1, 1], [1, 0]])


def test_invariant_under_cluster_relabelling():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 7, size=503)
    pred = np.where(rng.random(503) < 0.6, y, rng.integers(0, 9, size=503))  # 9 clusters, 7 classes
    perm = rng.permutation(9)
    a, b = clustering_metrics(y, pred), clustering_metrics(y, perm[pred] + 100)
    assert a == pytest.approx(b)
    assert set(a) == {"acc", "nmi", "ari"}
    assert 0.6 < a["acc"] < 0.7  # ~60% kept plus chance hits of the reassigned ones
    assert all(math.isfinite(v) for v in a.values())


def test_perfect_and_validation():
    y = [4, 4, 2, 2, 0]
    assert clustering_metrics(y, [1, 1, 0, 0, 2]) == pytest.approx({"acc": 1.0, "nmi": 1.0, "ari": 1.0})
    with pytest.raises(DataError, match="differ in length"):
        cluster_accuracy([0, 1, 2], [0, 1])
    with pytest.raises(DataError, match="empty"):
        nmi([], [])
