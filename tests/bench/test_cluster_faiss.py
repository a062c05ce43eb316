"""cluster_faiss's correctness check: `cluster`'s k-means may not end above scikit-learn's objective, may below."""

import pytest

from mixem.bench.cluster_faiss import check

CASE = {"n": 10, "d": 2, "k": 2, "niter": 20}


def _candidates(ours: float, sk: float = 1000.0) -> dict:
    return {"sklearn": lambda: (sk, 20), "mixem_cpu": lambda: (ours, 20), "faiss_cpu": lambda: (sk * 1.001, 20)}


@pytest.mark.parametrize("ours", [1000.0, 1000.05, 999.7, 995.0])
def test_equal_or_lower_objective_passes(ours):
    out = check(CASE, _candidates(ours))
    assert out["mixem_cpu_relative_gap"] == pytest.approx((ours - 1000.0) / 1000.0)


@pytest.mark.parametrize("ours", [1000.3, 1100.0, 980.0])
def test_higher_objective_or_far_lower_fails(ours):
    with pytest.raises(AssertionError, match="mixem_cpu objective"):
        check(CASE, _candidates(ours))
