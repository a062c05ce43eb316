"""faiss's k-means algorithm as Lloyd's iterations in torch: what `mixem.kmeans` runs on a CUDA GPU that pip's
faiss-cpu cannot use (and on the CPU when asked, to check it against faiss)."""

from __future__ import annotations

import numpy as np

SPLIT_EPS = 1.0 / 1024  # faiss's relative perturbation when it splits a cluster to refill an empty one
TORCH_BLOCK = 65536  # rows per distance block: (block, k) floats at a time


def lloyd_torch(x: np.ndarray, c0: np.ndarray, niter: int, spherical: bool, mppc: int, seed: int, dev: str):
    """Lloyd's iterations in torch, faiss's algorithm: assign every training point to its nearest centroid
    (inner product when spherical), centroid = mean of its points, an empty cluster takes half of a
    random large one (chosen with probability ~ its size, both copies nudged by +-SPLIT_EPS, as faiss
    does), unit-norm centroids when spherical; then every point assigned to the final centroids.

    On a GPU, x stays in host memory and moves block by block when it would take more than half of the
    free GPU memory. Sums are float64; on CUDA index_add_ uses atomics, so the last bits can vary.
    """
    import torch

    device = torch.device("cuda" if dev == "gpu" else "cpu")
    N, D = x.shape
    k = c0.shape[0]
    rng = np.random.default_rng(seed)
    train = x if N <= k * mppc else x[np.sort(rng.choice(N, k * mppc, replace=False))]
    resident = device.type == "cpu" or train.nbytes < torch.cuda.mem_get_info(device)[0] // 2

    def held(a: np.ndarray) -> torch.Tensor:  # on the device once, or in host memory (then moved per block)
        return torch.from_numpy(a).to(device) if resident else torch.from_numpy(a)

    def blocks(t: torch.Tensor):
        for s in range(0, len(t), TORCH_BLOCK):
            yield s, t[s : s + TORCH_BLOCK].to(device)

    train_t = held(train)

    def nearest(xb, c, c_sq):  # (B,) cluster and (B,) its score: -(squared distance) or inner product
        ip = xb @ c.T
        sc = ip if spherical else 2.0 * ip - c_sq[None, :]  # - |x - c|^2 + |x|^2: the same argmax
        best, a = sc.max(1)
        return a, best

    c = torch.from_numpy(np.ascontiguousarray(c0, dtype=np.float32)).to(device)
    for _ in range(niter):
        c_sq = (c * c).sum(1)
        sums = torch.zeros((k, D), dtype=torch.float64, device=device)
        counts = torch.zeros(k, dtype=torch.int64, device=device)
        for _, xb in blocks(train_t):
            a, _ = nearest(xb, c, c_sq)
            sums.index_add_(0, a, xb.double())
            counts += torch.bincount(a, minlength=k)
        n_of = counts.cpu().numpy()
        new = (sums / counts.clamp(min=1)[:, None].double()).float().cpu().numpy()
        split_empty(new, n_of, len(train), rng)
        c = torch.from_numpy(new).to(device)
        if spherical:  # unit rows; an all-zero row stays zero
            c = c / c.norm(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    c_sq = (c * c).sum(1)
    assign = np.empty(N, np.int64)
    dist = np.empty(N, np.float32)
    x_t = train_t if train is x else held(x)
    for s, xb in blocks(x_t):
        a, best = nearest(xb, c, c_sq)
        x_sq = (xb * xb).sum(1)
        d = x_sq - 2.0 * best + c_sq[a] if spherical else x_sq - best
        assign[s : s + len(xb)] = a.cpu().numpy()
        dist[s : s + len(xb)] = d.clamp(min=0).cpu().numpy()
    return c.cpu().numpy(), assign, dist


def split_empty(c: np.ndarray, counts: np.ndarray, n: int, rng: np.random.Generator) -> None:
    """faiss's rule for empty clusters, in place: each takes a copy of a cluster drawn with probability
    ~ (its size - 1) / (n - k), the two copies pushed apart by +-SPLIT_EPS per coordinate."""
    k = len(c)
    signs = np.where(np.arange(c.shape[1]) % 2 == 0, 1.0, -1.0).astype(np.float32)
    for ci in np.flatnonzero(counts == 0):
        cj = 0
        while True:  # faiss's loop: walk the clusters until one is drawn
            if rng.random() < (counts[cj] - 1.0) / max(n - k, 1):
                break
            cj = (cj + 1) % k
        c[ci] = c[cj] * (1 + signs * SPLIT_EPS)
        c[cj] = c[cj] * (1 - signs * SPLIT_EPS)
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
