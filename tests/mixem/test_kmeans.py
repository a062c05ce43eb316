"""FAISS k-means against scikit-learn on real data, every point counted, inits honoured, mixture init."""

import sys
import time
import warnings

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits

import mixem.kmeans
from mixem.errors import ConfigError, DataError
from mixem.kmeans import _centre, faiss_num_gpus, kmeans, l2_normalize, resolve_backend
from mixem.kmeans_torch import SPLIT_EPS, split_empty
from mixem.metrics import cluster_accuracy
from mixem.seeding import kmeans_plus_plus, mixture_init_centroids


@pytest.fixture(scope="module")
def digits():
    d = load_digits()  # 1797 real 8x8 handwritten digits, shipped with scikit-learn
    return (d.data / 16.0).astype(np.float32), d.target


def _inertia(x, c, assign):
    return float(((x.astype(np.float64) - c[assign]) ** 2).sum())


def test_objective_matches_sklearn_on_digits(digits):
    x, y = digits
    t = time.perf_counter()
    res = kmeans(x, 10, nredo=10, niter=50, seed=0)
    t_faiss = time.perf_counter() - t
    t = time.perf_counter()
    sk = KMeans(10, n_init=10, random_state=0).fit(x)
    t_sk = time.perf_counter() - t
    # Observed (2 CPU cores, faiss-cpu 1.15.1, sklearn 1.9.1): faiss 4551.53 (0.06 s) vs sklearn
    # 4551.52 (0.10 s); seconds printed for the report, never asserted.
    print(f"faiss {res.objective:.2f} ({t_faiss:.2f}s) sklearn {sk.inertia_:.2f} ({t_sk:.2f}s)")
    assert res.objective < sk.inertia_ * 1.1
    assert res.objective == pytest.approx(_inertia(x, res.centroids, res.assign), rel=1e-4)
    assert cluster_accuracy(y, res.assign) > 0.75  # observed 0.790; scikit-learn's KMeans on the digits: 0.790-0.793
    assert (res.n_points_used, res.sampled, res.device) == (len(x), False, resolve_backend()[1])
    assert res.centroids.shape == (10, 64) and res.assign.shape == res.distances.shape == (len(x),)


def test_assignment_is_nearest_centroid(digits):
    x, _ = digits
    res = kmeans(x, 7, niter=5, seed=1)
    d = ((x[:, None, :] - res.centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(res.assign, d.argmin(1))
    np.testing.assert_allclose(res.distances, d.min(1), rtol=1e-4, atol=1e-4)


def test_subsampling_is_reported_and_all_points_still_assigned(digits):
    x, _ = digits
    res = kmeans(x, 10, max_points_per_centroid=50, niter=5)
    assert res.sampled and res.n_points_used == 500
    assert res.assign.shape == (len(x),) and np.isfinite(res.distances).all()
    full = kmeans(x, 3, niter=5)  # None: ceil(N/k) per centroid, so nothing is dropped
    assert not full.sampled and full.n_points_used == len(x)


def test_seeding_from_a_sample_at_scale(digits, monkeypatch):
    import mixem.seeding

    x, _ = digits
    full = kmeans(x, 10, niter=30, nredo=3, seed=2)
    monkeypatch.setattr(mixem.seeding, "SEED_POINTS_PER_CENTROID", 20)  # seeds from 200 of 1797 points
    sub = kmeans(x, 10, niter=30, nredo=3, seed=2)
    assert sub.n_points_used == len(x) and sub.assign.shape == (len(x),)
    assert sub.objective < full.objective * 1.1


def test_given_centroids_are_honoured(digits):
    x, _ = digits
    init = x[[0, 100, 200, 300, 400]] + 0.01
    res = kmeans(x, 5, init=init, niter=0)
    np.testing.assert_array_equal(res.centroids, init.astype(np.float32))
    moved = kmeans(x, 5, init=init, niter=10)
    assert moved.objective < res.objective
    with pytest.raises(ConfigError, match=r"shape \(5, 64\)"):
        kmeans(x, 5, init=init[:4])


def test_spherical_centroids_are_unit_norm(digits):
    x = l2_normalize(digits[0])
    res = kmeans(x, 10, spherical=True, niter=20, nredo=2)
    np.testing.assert_allclose(np.linalg.norm(res.centroids, axis=1), 1.0, atol=1e-5)
    assert res.objective == pytest.approx(_inertia(x, res.centroids, res.assign), rel=1e-4)
    # for unit x the max-inner-product assignment is the nearest-centroid one
    np.testing.assert_array_equal(res.assign, (x @ res.centroids.T).argmax(1))


def test_seeds_are_deterministic(digits):
    x, _ = digits
    a, b, c = (kmeans_plus_plus(x, 10, seed=s) for s in (3, 3, 4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert all((x == row).all(1).any() for row in a)  # seeds are data points
    r1, r2 = kmeans(x, 10, nredo=2, niter=10, seed=5), kmeans(x, 10, nredo=2, niter=10, seed=5)
    np.testing.assert_array_equal(r1.assign, r2.assign)
    # init="random" starts from data points drawn at random, not from k-means++ seeds (niter=0 returns the start).
    rand = kmeans(x, 10, init="random", niter=0, seed=5).centroids
    assert all((x == row).all(1).any() for row in rand)
    assert not np.array_equal(rand, kmeans(x, 10, niter=0, seed=5).centroids)


def test_kmeans_plus_plus_conditioned_on_given_centres():
    rng = np.random.default_rng(0)
    blobs = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]], dtype=np.float32)
    x = np.concatenate([b + rng.standard_normal((50, 2)).astype(np.float32) for b in blobs])
    c = kmeans_plus_plus(x, 3, seed=0, centers=blobs[:2])
    np.testing.assert_array_equal(c[:2], blobs[:2])
    assert np.linalg.norm(c[2] - blobs[2]) < 10  # D² sampling puts the new seed in the uncovered blob


def test_mixture_init_means_and_empty_component():
    rng = np.random.default_rng(1)
    feats = np.concatenate([rng.normal(m, 0.1, (20, 3)) for m in (0.0, 5.0, 10.0)]).astype(np.float32)
    probs = np.full((60, 4), 0.01, dtype=np.float32)
    probs[:20, 0] = probs[20:40, 1] = probs[40:, 3] = 0.97  # component 2 is empty
    c = mixture_init_centroids(feats, probs, 4, seed=0)
    np.testing.assert_allclose(c[0], feats[:20].mean(0), rtol=1e-5)
    np.testing.assert_allclose(c[1], feats[20:40].mean(0), rtol=1e-5)
    np.testing.assert_allclose(c[3], feats[40:].mean(0), rtol=1e-5)
    assert (feats == c[2]).all(1).any()  # the empty slot got a k-means++-drawn data point
    np.testing.assert_array_equal(c, mixture_init_centroids(feats, probs, 4, seed=0))
    # kmeans(init="mixture") is that start, one run, whatever nredo asks: the same as passing c.
    a = kmeans(feats, 4, init="mixture", mixture_probs=probs, niter=3, nredo=5, seed=0)
    b = kmeans(feats, 4, init=c, niter=3, seed=0)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    with pytest.raises(ConfigError, match="mixture_probs"):
        kmeans(feats, 4, init="mixture")


def test_mixture_init_frequency_based_when_k_differs():
    feats = np.arange(12, dtype=np.float32).reshape(12, 1)
    assign = np.array([0] * 5 + [1] * 1 + [2] * 4 + [3] * 2)
    c = mixture_init_centroids(feats, assign, 2)  # K=4 > k=2: components 0 (5 pts) and 2 (4 pts)
    np.testing.assert_allclose(c[:, 0], [2.0, 7.5])
    c = mixture_init_centroids(feats, assign, 6, n_components=4, seed=0)  # K=4 < k=6: 2 seeded
    np.testing.assert_allclose(np.sort(c[:4, 0]), [2.0, 5.0, 7.5, 10.5])
    assert len(np.unique(c[:, 0])) == 6
    with pytest.raises(DataError, match="row-aligned"):
        mixture_init_centroids(feats, assign[:5], 2)


def test_bad_inputs_are_named():
    x = np.zeros((5, 2), dtype=np.float32)
    with pytest.raises(ConfigError, match="k must be between"):
        kmeans(x, 6)
    with pytest.raises(ConfigError, match="unknown k-means init"):
        kmeans(x, 2, init="kmeans||")
    x[0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        kmeans(x, 2)


@pytest.mark.parametrize("backend", ["sklearn", "faiss"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("sampled", [False, True])
def test_non_finite_input_is_refused_for_every_start(digits, backend, bad, sampled):
    """A start that draws points checks the input first; a given or mixture start finds a non-finite point by
    its distance to its final centre (checked after k-means, one pass fewer): the same one-line error."""
    x = digits[0].copy()
    x[len(x) // 3, 5] = bad  # one value of one point
    mppc = 20 if sampled else None  # 10 * 20 points train it; every point is still assigned and measured
    probs = np.eye(10, dtype=np.float32)[digits[1]]
    starts = ["kmeans++", "random", "mixture", x[:10].copy()]
    for init in starts:
        if isinstance(init, np.ndarray):
            init[3, 5] = 0.0  # the given centroids themselves are finite
        with pytest.raises(DataError, match="NaN or infinite"), warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # the one-line error, not numpy warnings before it
            kmeans(x, 10, init=init, mixture_probs=probs, niter=3, backend=backend, max_points_per_centroid=mppc)


@pytest.mark.skipif(faiss_num_gpus() > 0 or torch.cuda.is_available(), reason="checks the CPU fallback; a GPU is here")
def test_gpu_request_without_gpu_falls_back_to_cpu(digits):
    with pytest.warns(UserWarning, match="runs on the CPU"):
        res = kmeans(digits[0], 4, niter=2, gpu=True)
    assert (res.device, res.backend, res.where) == ("cpu", "sklearn", "sklearn on the CPU")


@pytest.mark.parametrize("spherical", [False, True])
def test_torch_backend_matches_faiss(digits, spherical):
    """The torch Lloyd loop (what runs on a CUDA GPU when faiss is faiss-cpu) is faiss's algorithm: from the
    same start, the same centroids, assignments and objective (here both on the CPU)."""
    x = l2_normalize(digits[0]) if spherical else digits[0]
    init = x[np.random.default_rng(3).choice(len(x), 10, replace=False)]
    f = kmeans(x, 10, init=init, niter=20, spherical=spherical, backend="faiss", gpu=False)
    t = kmeans(x, 10, init=init, niter=20, spherical=spherical, backend="torch", gpu=False)
    assert (t.backend, t.device, f.backend) == ("torch", "cpu", "faiss")
    assert (np.bincount(f.assign, minlength=10) > 0).all()  # no split happened, so no RNG is involved
    np.testing.assert_allclose(t.centroids, f.centroids, atol=2e-5)
    assert (t.assign == f.assign).mean() > 0.999
    assert t.objective == pytest.approx(f.objective, rel=1e-5)
    np.testing.assert_allclose(t.distances, f.distances, atol=1e-4)
    if spherical:
        np.testing.assert_allclose(np.linalg.norm(t.centroids, axis=1), 1.0, rtol=1e-5)


def test_torch_backend_refills_empty_clusters_and_samples(digits):
    x, _ = digits
    init = x[:6].copy()
    init[5] = 1e3  # far from every digit: empty after the first assignment, so it takes half of a cluster
    for backend in ("faiss", "torch"):
        res = kmeans(x, 6, init=init, niter=10, backend=backend, gpu=False)
        assert (np.bincount(res.assign, minlength=6) > 0).all(), backend
        assert np.abs(res.centroids).max() < 2.0, backend
    sub = kmeans(x, 10, max_points_per_centroid=50, niter=5, backend="torch", gpu=False)
    assert sub.sampled and sub.n_points_used == 500 and sub.assign.shape == (len(x),)


def test_split_empty_follows_faiss():
    c = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]], np.float32)
    counts = np.array([5, 0, 1])
    split_empty(c, counts, 6, np.random.default_rng(0))  # only cluster 0 can be drawn: (1 - 1) / 3 = 0
    e = SPLIT_EPS
    np.testing.assert_allclose(c[1], [1 + e, 2 * (1 - e), 3 * (1 + e)], rtol=1e-6)
    np.testing.assert_allclose(c[0], [1 - e, 2 * (1 + e), 3 * (1 - e)], rtol=1e-6)
    assert counts.tolist() == [3, 2, 1]


@pytest.mark.gpu
def test_torch_backend_on_cuda_matches_cpu(digits):
    x, _ = digits
    init = x[:10].copy()
    g = kmeans(x, 10, init=init, niter=20, backend="torch", gpu=True)
    c = kmeans(x, 10, init=init, niter=20, backend="torch", gpu=False)
    assert (g.device, c.device) == ("gpu", "cpu")
    np.testing.assert_allclose(g.centroids, c.centroids, atol=1e-4)
    assert g.objective == pytest.approx(c.objective, rel=1e-5)


@pytest.mark.faiss_gpu
@pytest.mark.skipif(faiss_num_gpus() == 0, reason="needs faiss with GPU support (faiss-gpu) and a CUDA device")
def test_gpu_matches_cpu(digits):
    x, _ = digits
    init = x[:10].copy()
    g, c = kmeans(x, 10, init=init, niter=20, gpu=True), kmeans(x, 10, init=init, niter=20, gpu=False)
    assert g.device == "gpu" and c.device == "cpu"
    assert g.objective == pytest.approx(c.objective, rel=1e-3)


@pytest.mark.parametrize("backend", ["sklearn", "faiss"])
@pytest.mark.parametrize("niter", [0, 3])
def test_every_cpu_backend_assigns_every_point_to_its_nearest_centroid(digits, backend, niter):
    x, _ = digits
    x = x[:1001]  # an odd count
    res = kmeans(x, 9, niter=niter, seed=2, gpu=False, backend=backend)
    d = ((x[:, None, :].astype(np.float64) - res.centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(res.assign, d.argmin(1))
    np.testing.assert_allclose(res.distances, d.min(1), rtol=1e-4, atol=1e-5)
    assert res.objective == pytest.approx(d.min(1).sum(), rel=1e-5) and res.backend == backend


@pytest.mark.parametrize("offset", [0.0, 1000.0])  # near the origin (used as is) and far from it (centred first)
def test_sklearn_backend_is_sklearns_lloyd_and_auto_picks_it_on_the_cpu(digits, offset):
    x, _ = digits
    # 1,024 rows of sixteenths: column means are exact, so centring (theirs, ours) gives both loops the same floats.
    x = x[:1024] - x[:1024].mean(0) + np.float32(offset)
    init = x[np.random.default_rng(3).choice(len(x), 10, replace=False)]
    ours = kmeans(x, 10, init=init, niter=15, gpu=False)
    sk = KMeans(10, init=init, n_init=1, max_iter=15, tol=0.0, algorithm="lloyd").fit(x)
    assert ours.backend == "sklearn" and ours.objective == pytest.approx(sk.inertia_, rel=1e-5)
    np.testing.assert_array_equal(ours.assign, sk.labels_)
    assert (_centre(x) is None) == (offset == 0)


def test_data_used_uncentred_gives_a_lloyd_solution_as_good_as_sklearns(digits):
    x, _ = digits  # pixels in [0, 1]: mean and spread alike, so not centred; rounding may move a near-tie
    before = x.copy()
    init = x[np.random.default_rng(3).choice(len(x), 10, replace=False)]
    ours = kmeans(x, 10, init=init, niter=15, gpu=False)
    sk = KMeans(10, init=init, n_init=1, max_iter=15, tol=0.0, algorithm="lloyd").fit(x)
    assert _centre(x) is None and ours.objective == pytest.approx(sk.inertia_, rel=1e-4)
    np.testing.assert_array_equal(x, before)  # used in place, and only read
    assert (ours.assign == sk.labels_).mean() > 0.99
    x, _ = digits
    sampled = kmeans(x, 10, init=init, niter=5, gpu=False, max_points_per_centroid=40)
    assert sampled.sampled and sampled.n_points_used == 400 and sampled.assign.shape == (len(x),)
    # Spherical k-means is faiss's: scikit-learn has none.
    assert resolve_backend(False, "auto", spherical=True) == ("faiss", "cpu")
    assert kmeans(l2_normalize(x), 10, niter=3, spherical=True, gpu=False).backend == "faiss"
    with pytest.raises(ConfigError, match="no spherical"):
        kmeans(x, 10, spherical=True, backend="sklearn")


def test_overwrite_x_gives_the_same_result_and_leaves_x_as_it_was(digits):
    x, _ = digits
    mine = x.copy()
    a = kmeans(x, 8, niter=6, seed=4, gpu=False)
    b = kmeans(mine, 8, niter=6, seed=4, gpu=False, overwrite_x=True)
    np.testing.assert_array_equal(a.assign, b.assign)
    assert b.objective == pytest.approx(a.objective, rel=1e-6)
    np.testing.assert_allclose(mine, x, rtol=0, atol=1e-6)  # centred in place and restored: one rounding at most


def test_without_sklearns_private_loop_the_public_kmeans_gives_the_same_result(digits, monkeypatch):
    x, _ = digits
    x = x[:1024] - x[:1024].mean(0)  # exact column means: KMeans.fit's own centring changes no float
    init = x[np.random.default_rng(5).choice(len(x), 10, replace=False)]
    fast = kmeans(x, 10, init=init, niter=12, gpu=False)
    calls = []
    public_fit = mixem.kmeans._sklearn_public
    monkeypatch.setattr(mixem.kmeans, "_sklearn_public", lambda *a: calls.append(1) or public_fit(*a))
    monkeypatch.setitem(sys.modules, "sklearn.cluster._k_means_lloyd", None)  # its import now fails
    public = kmeans(x, 10, init=init, niter=12, gpu=False)
    assert calls == [1], "the public KMeans ran"
    np.testing.assert_array_equal(public.assign, fast.assign)
    np.testing.assert_allclose(public.centroids, fast.centroids, rtol=0, atol=1e-5)
    assert public.objective == pytest.approx(fast.objective, rel=1e-6)
