"""k-means over every point: scikit-learn's Lloyd on the CPU (FAISS for spherical k-means), FAISS on its GPUs,
faiss's Lloyd in torch on a CUDA GPU it cannot use (resolve_backend)."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np

from mixem.config import KMEANS_BACKENDS, KMEANS_INITS, KMEANS_SEEDINGS
from mixem.errors import ConfigError, DataError
from mixem.seeding import initial_centroids, mixture_init_centroids, row_sq


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (k, D) float32; unit rows when spherical
    assign: np.ndarray  # (N,) int64 cluster of every input point
    distances: np.ndarray  # (N,) float32 squared L2 distance of each point to its centroid
    objective: float  # sum of `distances` over all N points (inertia); the best redo's
    device: str  # "cpu" or "gpu": where the iterations ran
    sampled: bool  # True when faiss trained on a random subset (max_points_per_centroid * k < N)
    n_points_used: int  # points faiss trained on; assign/distances/objective always cover all N
    backend: str = "faiss"  # "sklearn" (CPU), "faiss", or "torch" (Lloyd on a CUDA GPU that faiss cannot use)

    @property
    def where(self) -> str:
        return describe_backend(self.backend, self.device)


def describe_backend(backend: str, device: str) -> str:
    """For logs and metrics: 'faiss on the CPU', 'faiss on the GPU' or 'torch on the GPU'."""
    return f"{backend} on the {device.upper()}"


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Float32 copy with unit-norm rows; all-zero rows stay zero instead of becoming NaN."""
    x = np.array(x, dtype=np.float32, copy=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x /= np.maximum(norms, np.finfo(np.float32).tiny)
    return x


def faiss_num_gpus() -> int:
    """GPUs faiss can use: 0 with faiss-cpu (which has no get_num_gpus in old builds) or no CUDA device."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_backend(gpu="auto", backend: str = "auto", spherical: bool = False) -> tuple[str, str]:
    """(backend, device) k-means runs on: faiss on its GPUs when it has any; else, for gpu "auto"/True,
    Lloyd's iterations in torch on a CUDA GPU (pip's faiss-cpu has no GPU code; faiss-gpu is rarely
    installable); else the CPU: scikit-learn's Lloyd (OpenMP over 256-row blocks, BLAS inside each; its loop
    driven from here without KMeans.fit's extra passes), the fastest CPU Lloyd we measured (`bench
    cluster_faiss`: 1.3-1.4x faiss-cpu at 100k and 1M points), or
    faiss for spherical k-means, which scikit-learn does not have. backend forces "sklearn", "faiss" or
    "torch" (torch: cuda when there is one, else the CPU; used to check it against faiss). device is
    "gpu" or "cpu"."""
    if gpu not in ("auto", True, False):
        raise ConfigError(f"gpu must be 'auto', True or False, got {gpu!r}")
    if backend not in KMEANS_BACKENDS:
        raise ConfigError(f"k-means backend must be one of {', '.join(KMEANS_BACKENDS)}, got {backend!r}")
    want_gpu = gpu in ("auto", True)
    if backend == "torch":
        return "torch", "gpu" if want_gpu and _torch_cuda() else "cpu"
    if backend == "sklearn":
        if spherical:
            raise ConfigError("scikit-learn has no spherical k-means; use backend faiss or auto")
        return "sklearn", "cpu"
    if want_gpu and faiss_num_gpus() > 0:
        return "faiss", "gpu"
    if backend == "auto" and want_gpu and _torch_cuda():
        return "torch", "gpu"
    if gpu is True:
        warnings.warn("no GPU for k-means (faiss-cpu and no CUDA device): it runs on the CPU", stacklevel=3)
    return ("sklearn" if backend == "auto" and not spherical else "faiss"), "cpu"


def _non_finite() -> DataError:
    return DataError("k-means input holds NaN or infinite values: check the embeddings that produced it")


def _all_finite(x: np.ndarray, rows: int = 65536) -> bool:
    return all(np.isfinite(x[s : s + rows]).all() for s in range(0, len(x), rows))  # bounded temporaries


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    init: str | np.ndarray = "kmeans++",
    mixture_probs: np.ndarray | None = None,
    spherical: bool = False,
    niter: int = 25,
    nredo: int = 1,
    seed: int = 0,
    max_points_per_centroid: int | None = None,
    gpu: str | bool = "auto",
    backend: str = "auto",
    overwrite_x: bool = False,
) -> KMeansResult:
    """Lloyd k-means on the backend resolve_backend picks, keeping the best of `nredo` seedings by objective.

    x: (N, D) float32. init: "kmeans++", "random", "mixture" (MIX'EM's start: the means of the argmax
    groups of `mixture_probs`, (N, K) row-aligned with x; see mixture_init_centroids), or (k, D) initial
    centroids. "mixture" and given centroids make one run: every redo would start from the same centres.
    spherical: unit-norm centroids and inner-product assignment (for L2-normalised x this is the same partition
    as L2). max_points_per_centroid: None trains on every point; faiss's default of 256 subsamples to 256·k.
    gpu: "auto" uses a GPU when there is one (faiss's, else torch's: resolve_backend); the result says
    where it ran. backend: "auto", or "sklearn" / "faiss" / "torch" to force one. overwrite_x: x may serve
    as scratch where it must be centred (far from the origin: centred in place and restored, each value to
    within one float32 rounding) instead of a copy of the data: one N x D array less at the peak.
    """
    if x.ndim != 2:
        raise DataError(f"k-means needs a 2-D (points, dims) array, got shape {tuple(x.shape)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    N, D = x.shape
    if not 1 <= k <= N:
        raise ConfigError(f"k must be between 1 and the number of points ({N}), got {k}")
    if niter < 0 or nredo < 1:
        raise ConfigError(f"niter must be >= 0 and nredo >= 1, got niter={niter}, nredo={nredo}")
    how, dev = resolve_backend(gpu, backend, spherical)
    # Non-finite input is refused. For scikit-learn from a start that does not draw points (the mixture's
    # groups, given centroids), every point's distance to its final centre, which k-means returns anyway, is
    # non-finite exactly where the point is (x - c with NaN or inf in x): checked there, one pass fewer.
    # (faiss stops on such input in C++ with a RuntimeError, and seeding draws by distance: checked first.)
    after = how == "sklearn" and not (isinstance(init, str) and init in KMEANS_SEEDINGS)
    if not after and not _all_finite(x):
        raise _non_finite()
    init, nredo = _resolve_init(x, k, init, mixture_probs, seed, nredo)
    mppc = math.ceil(N / k) if max_points_per_centroid is None else int(max_points_per_centroid)
    if mppc < 1:
        raise ConfigError(f"max_points_per_centroid must be >= 1, got {mppc}")
    x_sq = row_sq(x) if spherical else None

    # Independent streams per redo, so calls with seeds 0 and 1 do not share nredo - 1 of their runs.
    redo_seeds = np.random.default_rng(seed).integers(2**31 - 1, size=nredo)
    best = None
    for r in range(nredo):
        c0 = initial_centroids(x, k, init, int(redo_seeds[r]))
        if spherical:
            c0 = l2_normalize(c0)
        if how == "torch":
            from mixem.kmeans_torch import lloyd_torch

            centroids, assign, dist = lloyd_torch(x, c0, niter, spherical, mppc, int(redo_seeds[r]), dev)
        elif how == "sklearn":
            with np.errstate(invalid="ignore", over="ignore") if after else contextlib.nullcontext():  # checked below
                centroids, assign, dist = _lloyd_sklearn(x, c0, niter, mppc, int(redo_seeds[r]), overwrite_x)
        else:
            centroids, assign, dist = _lloyd_faiss(x, c0, niter, spherical, mppc, int(redo_seeds[r]), dev, x_sq)
        if after and not np.isfinite(dist).all():
            raise _non_finite()
        obj = float(dist.sum(dtype=np.float64))
        if best is None or obj < best.objective:
            best = KMeansResult(
                centroids=np.ascontiguousarray(centroids, dtype=np.float32),
                assign=assign,
                distances=dist,
                objective=obj,
                device=dev,
                sampled=N > k * mppc,
                n_points_used=min(N, k * mppc),
                backend=how,
            )
    return best


def _resolve_init(x: np.ndarray, k: int, init, mixture_probs, seed: int, nredo: int):
    """(init, nredo): the mixture's start as centroids, checked centroids (one run: every redo would start from
    them), or a seeding's name."""
    if isinstance(init, str) and init == "mixture":
        if mixture_probs is None:
            raise ConfigError("init='mixture' needs the mixture probabilities (mixture_probs)")
        init = mixture_init_centroids(x, mixture_probs, k, seed=seed)
    if isinstance(init, np.ndarray):
        if init.shape != (k, x.shape[1]):
            raise ConfigError(f"initial centroids must have shape ({k}, {x.shape[1]}), got {tuple(init.shape)}")
        return init, 1
    if init not in KMEANS_SEEDINGS:
        raise ConfigError(f"unknown k-means init {init!r}: choose one of {', '.join(KMEANS_INITS)}, or pass centroids")
    return init, nredo


def _lloyd_faiss(x, c0, niter, spherical, mppc, seed, dev, x_sq):
    """faiss.Kmeans from c0, then every point assigned to the final centroids: (centroids, assign, sq. dist)."""
    k, D = c0.shape
    km = faiss.Kmeans(
        D,
        k,
        niter=niter,
        nredo=1,  # faiss's later redos would restart from the previous result, not a new seeding
        spherical=spherical,
        seed=seed,  # faiss uses it for subsampling and for splitting empty clusters
        max_points_per_centroid=mppc,
        min_points_per_centroid=1,  # N >= k is checked above; the 39-per-centroid hint is only a print
        gpu=faiss_num_gpus() if dev == "gpu" else False,
    )
    km.train(x, init_centroids=c0)
    index = km.index
    index.reset()
    index.add(km.centroids)
    score, assign = index.search(x, 1)
    assign, score = assign[:, 0].astype(np.int64), score[:, 0]
    if spherical:  # the index returns inner products; report squared L2 like the Euclidean case
        c_sq = (km.centroids * km.centroids).sum(1)
        dist = np.maximum(x_sq + c_sq[assign] - 2.0 * score, 0.0).astype(np.float32)
    else:
        dist = np.maximum(score, 0.0)
    return km.centroids, assign, dist


def _lloyd_sklearn(x: np.ndarray, c0: np.ndarray, niter: int, mppc: int, seed: int, overwrite_x: bool = False):
    """scikit-learn's Lloyd from c0 for niter iterations (tol 0: it stops early only at a fixed point, where
    more iterations change nothing), on every point or faiss's random sample of k * mppc; then every point
    assigned to the final centroids. An empty cluster takes the point farthest from its centre (sklearn's
    rule; faiss splits a large cluster instead)."""
    N, k = len(x), len(c0)
    rng = np.random.default_rng(seed)
    train = x if N <= k * mppc else x[np.sort(rng.choice(N, k * mppc, replace=False))]
    if niter == 0:
        centroids = np.ascontiguousarray(c0, dtype=np.float32)
    else:
        mean = _centre(train)
        scratch = train is not x or overwrite_x  # a sample is a copy already: scratch either way
        data = train if scratch or mean is None else train.copy()  # uncentred, the data is only read
        if mean is None:
            mean = np.zeros(x.shape[1], np.float32)
        else:
            data -= mean
        try:
            centroids, labels = _sklearn_iterations(data, np.asarray(c0, np.float32) - mean, niter, seed)
            if train is x:  # the last pass assigned every point to the final centroids: distances here
                dist = sq_distances(data, centroids, labels)
        finally:
            if data is x and mean.any():  # (a centred sample or copy is dropped as it is)
                data += mean  # the caller's points back, each value to within one float32 rounding
        centroids = np.ascontiguousarray(centroids + mean, dtype=np.float32)
        if train is x:
            return centroids, labels, dist
    assign = faiss.knn(x, centroids, 1)[1][:, 0].astype(np.int64)
    return centroids, assign, sq_distances(x, centroids, assign)


CENTRE_RATIO = 100.0  # centre the data when its mean's squared norm passes this many times its variance


def _centre(x: np.ndarray, sample: int = 4096) -> np.ndarray | None:
    """The mean to centre x on before scikit-learn's float32 distances (||c||^2 - 2 x.c lose bits as the points
    sit farther from the origin than their spread), as KMeans.fit always does; or None where x already sits
    near the origin relative to its spread (judged on an even sample of rows: ||mean||^2 <= CENTRE_RATIO x
    variance, where those float32 terms lose at most ~2e-5 of a typical distance): centring then buys no
    accuracy and costs three passes over the data (the mean, then centring and restoring: 14 of ~500 ms of a
    20-iteration run at 100k x 128, timed alone), and uncentred data need not be copied. Unit-norm embeddings
    always qualify."""
    s = x[:: max(1, len(x) // sample)].astype(np.float64)
    m = s.mean(axis=0)
    if m @ m <= CENTRE_RATIO * ((s - m) ** 2).sum(axis=1).mean():
        return None
    return x.mean(axis=0)


def _sklearn_iterations(x: np.ndarray, c0: np.ndarray, niter: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(centroids, labels of every x at them) after scikit-learn's Lloyd on float32 x (centred where _centre asks).

    KMeans.fit's own loop (`lloyd_iter_chunked_dense`: OpenMP over blocks of rows, one BLAS thread each,
    labels fused into the GEMM's blocks), driven from here: fit's extra passes are work `kmeans` does not
    need (row norms for seeding it does not do, a separate inertia pass where our per-point distances give
    it, a Python set of the labels): 4 % of its time at 100k points, timed alone. A scikit-learn
    without that private function gets the public KMeans: the same iterations, slower."""
    try:
        from sklearn.cluster._k_means_lloyd import lloyd_iter_chunked_dense as step
        from sklearn.utils._openmp_helpers import _openmp_effective_n_threads as omp_threads
    except ImportError:
        return _sklearn_public(x, c0, niter, seed)
    centers, spare = np.array(c0, np.float32), np.zeros_like(c0, dtype=np.float32)
    labels = np.full(len(x), -1, np.int32)
    old, ones = labels.copy(), np.ones(len(x), np.float32)
    weights, shift = np.zeros(len(centers), np.float32), np.zeros(len(centers), np.float32)
    threads, fixed = omp_threads(), False
    with _blas_limit():
        for _ in range(niter):
            step(x, ones, centers, spare, weights, labels, shift, threads)
            centers, spare = spare, centers
            if np.array_equal(labels, old):  # a fixed point: more iterations change nothing
                fixed = True
                break
            old[:] = labels
        if not fixed:  # labels for the final centres, as fit's last E-step
            step(x, ones, centers, centers, weights, labels, shift, threads, update_centers=False)
    return centers, labels.astype(np.int64)


def _blas_limit():
    """One BLAS thread inside scikit-learn's OpenMP loop, as fit does (no nested oversubscription)."""
    return _threadpools().limit(limits=1, user_api="blas")


@functools.cache
def _threadpools():
    """One threadpoolctl controller for the process: building one scans the loaded libraries (3-14 ms)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _sklearn_public(x: np.ndarray, c0: np.ndarray, niter: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    import sklearn
    from sklearn.cluster import KMeans

    km = KMeans(len(c0), init=c0, n_init=1, max_iter=niter, tol=0.0, algorithm="lloyd", random_state=seed, copy_x=False)
    # assume_finite: kmeans() refuses non-finite input itself (sklearn's own check is one more pass).
    with warnings.catch_warnings(), sklearn.config_context(assume_finite=True):
        warnings.simplefilter("ignore")  # "fewer distinct points than clusters": the objective says so
        km.fit(x)
    return np.asarray(km.cluster_centers_, np.float32), km.labels_.astype(np.int64)


def sq_distances(x: np.ndarray, centroids: np.ndarray, assign: np.ndarray, rows: int = 8192) -> np.ndarray:
    """(N,) float32 squared L2 distance of every point to its assigned centroid: blocks of rows on a thread
    per core (numpy releases the GIL; 3x one thread at 100k x 128), bounded temporaries."""
    out = np.empty(len(x), np.float32)

    def block(s: int):
        diff = x[s : s + rows] - centroids[assign[s : s + rows]]
        out[s : s + rows] = np.einsum("ij,ij->i", diff, diff)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(block, range(0, len(x), rows)))
    return out
