"""k-means starts: greedy k-means++ (optionally conditioned on given centres) and MIX'EM's mixture-component means."""

from __future__ import annotations

import math

import faiss
import numpy as np
import scipy.sparse

from mixem.errors import ConfigError, DataError

SEED_POINTS_PER_CENTROID = 1024  # k-means++ seeds from at most k * this many points (see seeding_sample)


def row_sq(x: np.ndarray) -> np.ndarray:
    return np.einsum("nd,nd->n", x, x)  # (N,) without materialising x * x (N, D)


def _sqdist(x: np.ndarray, c: np.ndarray, x_sq: np.ndarray) -> np.ndarray:
    """(N, m) squared L2 distances, clipped at 0 (the expansion can go slightly negative in float32)."""
    d = x_sq[:, None] + (c * c).sum(1)[None, :] - 2.0 * (x @ c.T)
    return np.maximum(d, 0.0, out=d)


def kmeans_plus_plus(
    x: np.ndarray, k: int, *, seed: int = 0, centers: np.ndarray | None = None, n_local_trials: int | None = None
) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; scikit-learn's variant: at each step
    draw 2 + ln k candidates by D² sampling and keep the one that lowers the potential most).

    Written here because faiss before 1.14 has only random initialisation, and because MIX'EM's
    mixture init needs seeding *conditioned on given centres* (empty components): `centers` (m, D)
    are kept as the first m rows and only k - m new ones are drawn. Returns (k, D) float32.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    N, D = x.shape
    rng = np.random.default_rng(seed)
    trials = n_local_trials if n_local_trials is not None else 2 + int(math.log(k))
    chosen = np.empty((k, D), dtype=np.float32)
    m = 0 if centers is None else len(centers)
    if m > k:
        raise ConfigError(f"kmeans_plus_plus got {m} given centres for k={k}")
    x_sq = row_sq(x)
    if m:
        chosen[:m] = centers
        closest = faiss.knn(x, chosen[:m], 1)[0][:, 0].astype(np.float64)  # (N,) blockwise in faiss
        closest = np.maximum(closest, 0.0)
    else:
        chosen[0] = x[rng.integers(N)]
        m = 1
        closest = _sqdist(x, chosen[:1], x_sq)[:, 0].astype(np.float64)
    for i in range(m, k):
        potential = closest.sum()
        if potential <= 0.0:  # every point already sits on a centre: any point is as good as another
            cand = rng.integers(N, size=1)
        else:
            cum = np.cumsum(closest)
            cand = np.searchsorted(cum, rng.random(trials) * cum[-1], side="right")
            cand = np.minimum(cand, N - 1)
        d = np.minimum(closest[:, None], _sqdist(x, x[cand], x_sq))  # (N, trials)
        best = int(np.argmin(d.sum(0)))
        closest = d[:, best]
        chosen[i] = x[cand[best]]
    return chosen


def seeding_sample(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    # k-means++ is sequential in k and costs O(N k D); drawing the seeds from k * 1024 random points
    # makes it O(k² D) at millions of points, while a cluster holding 1/k of the data still has ~1024
    # points in the sample. Only the seeding is sampled: Lloyd's iterations use all N points.
    n_max = k * SEED_POINTS_PER_CENTROID
    if len(x) <= n_max:
        return x
    return x[np.sort(rng.choice(len(x), n_max, replace=False))]


def initial_centroids(x: np.ndarray, k: int, init, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if isinstance(init, np.ndarray):
        return np.ascontiguousarray(init, dtype=np.float32)
    if init == "random":
        return x[rng.choice(len(x), k, replace=False)].copy()
    return kmeans_plus_plus(seeding_sample(x, k, rng), k, seed=int(rng.integers(2**31)))


def mixture_init_centroids(
    features: np.ndarray, probs_or_assign: np.ndarray, k: int, *, seed: int = 0, n_components: int | None = None
) -> np.ndarray:
    """MIX'EM's "mean component init": (k, F) float32 initial centres from the mixture assignment.

    Each point goes to its argmax-π component; a component's centre is the mean of its points'
    features. K == k: centre i is component i. K != k: the k most frequent components (the released
    "FRQBASED" rule). Empty components, and the k - K missing centres when K < k, are drawn by
    k-means++ conditioned on the non-empty means: unlike the released code's uniform random vector
    in the feature range, such a point lies on the data and far from the existing centres, so it
    neither starts empty nor duplicates a centre.

    probs_or_assign: (N, K) mixture probabilities, or (N,) component indices (then K is
    n_components, or the largest index + 1).
    """
    features = np.ascontiguousarray(features, dtype=np.float32)
    pa = np.asarray(probs_or_assign)
    N = features.shape[0]
    if pa.shape[0] != N:
        raise DataError(f"{N} feature rows but {pa.shape[0]} mixture assignments: they must be row-aligned")
    if pa.ndim == 2:
        K, comp = pa.shape[1], pa.argmax(1)
    elif pa.ndim == 1 and np.issubdtype(pa.dtype, np.integer):
        comp = pa.astype(np.int64)
        if comp.min() < 0:
            raise DataError("component indices must be >= 0")
        K = n_components if n_components is not None else int(comp.max()) + 1
        if comp.max() >= K:
            raise DataError(f"component index {int(comp.max())} out of range for n_components={K}")
    else:
        raise DataError("probs_or_assign must be (N, K) probabilities or (N,) integer component indices")
    if not 1 <= k <= N:
        raise ConfigError(f"k must be between 1 and the number of points ({N}), got {k}")

    counts = np.bincount(comp, minlength=K)
    sums = np.zeros((K, features.shape[1]), dtype=np.float64)
    for s in range(0, N, 65536):  # float64 sums, in blocks so no (N, F) float64 copy is made
        block = features[s : s + 65536].astype(np.float64)
        n = len(block)
        sums += scipy.sparse.csr_matrix((np.ones(n), (comp[s : s + n], np.arange(n))), shape=(K, n)) @ block
    means = sums / np.maximum(counts, 1)[:, None]  # (K, F)
    if K == k:
        slots = np.arange(K)
    else:
        slots = np.argsort(-counts, kind="stable")[: min(k, K)]  # most frequent first
    filled = slots[counts[slots] > 0]
    given = means[filled].astype(np.float32)
    if len(given) == k:
        return given
    # Seed the missing centres after the given ones (from the same sample kmeans() seeds from: k-means++
    # over all N points is O(N k D), 36 s at 1M x 64), then put every centre back into its slot.
    rng = np.random.default_rng(seed)
    centres = kmeans_plus_plus(
        seeding_sample(features, k, rng), k, seed=int(rng.integers(2**31)), centers=given if len(given) else None
    )
    if K != k:
        return centres
    out = np.empty_like(centres)
    out[filled] = centres[: len(filled)]
    out[np.setdiff1d(np.arange(k), filled)] = centres[len(filled) :]
    return out
