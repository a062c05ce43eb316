"""cluster --k auto: k-means for every k of a range on a sample, each scored by its silhouette; the best k wins.

The silhouette (Rousseeuw 1987) of a point is (b - a) / max(a, b), with a its mean distance to its own
cluster and b to the nearest other one; its mean over points is high when clusters are tight and apart, it
needs no labels, and unlike the k-means objective it does not simply fall as k grows. Measured on the
quickstart model's embedding of the embedded Fashion-MNIST split (10 classes), k = 2..20: the silhouette
peaks at k = 11 (0.516; k = 9: 0.499, k = 10: 0.477), Calinski-Harabasz also at 11, Davies-Bouldin at 9.
"""

from __future__ import annotations

import time

import numpy as np

from mixem.errors import ConfigError

DEFAULT_RANGE = (2, 20)
SCAN_POINTS = 50_000  # k-means of the scan runs on a random sample this large (the final k-means on all)
SILHOUETTE_POINTS = 5_000  # the silhouette needs all pairwise distances of its points: a sample of the sample


def parse_range(text: str | tuple[int, int]) -> tuple[int, int]:
    """ "A:B" (or a pair) as (A, B), 2 <= A < B."""
    try:
        lo, hi = (int(v) for v in (text.split(":") if isinstance(text, str) else text))
    except (ValueError, TypeError):
        raise ConfigError(f"--k-range {text!r}: give two integers as A:B, e.g. 2:20") from None
    if not 2 <= lo < hi:
        raise ConfigError(f"--k-range {text!r}: need 2 <= A < B")
    return lo, hi


def scan(x: np.ndarray, k_range: tuple[int, int], seed: int = 0, gpu="auto") -> dict:
    """Score every k of the range; returns {"criterion", "rows": [{"k", "silhouette", "objective"}], "best", ...}."""
    from sklearn.metrics import silhouette_score

    from mixem.kmeans import kmeans

    t0 = time.perf_counter()
    lo, hi = k_range
    rng = np.random.default_rng(seed)
    sample = x if len(x) <= SCAN_POINTS else x[np.sort(rng.choice(len(x), SCAN_POINTS, replace=False))]
    hi = min(hi, len(sample) - 1)
    if hi < lo:
        raise ConfigError(f"--k auto needs more than {lo} embedded images, got {len(x)}")
    rows = []
    for k in range(lo, hi + 1):
        res = kmeans(sample, k, init="kmeans++", nredo=2, niter=25, seed=seed, gpu=gpu)
        if len(np.unique(res.assign)) < 2:
            continue  # every point in one cluster: no silhouette
        s = silhouette_score(sample, res.assign, sample_size=min(SILHOUETTE_POINTS, len(sample)), random_state=seed)
        rows.append({"k": k, "silhouette": round(float(s), 5), "objective": res.objective})
    if not rows:
        raise ConfigError("--k auto: every k of the range put all images in one cluster; give --k")
    best = max(rows, key=lambda r: r["silhouette"])["k"]
    return {
        "criterion": "mean silhouette (Euclidean, on unit vectors)",
        "range": [lo, hi],
        "points": len(sample),
        "silhouette_points": min(SILHOUETTE_POINTS, len(sample)),
        "rows": rows,
        "best": best,
        "seconds": round(time.perf_counter() - t0, 2),
    }
