"""Near-duplicates: every pair of images whose fingerprints (mixem.fingerprints) reach a cosine threshold, exactly.

Up to BRUTE_MAX rows, one FAISS range search of every row against all (IndexFlatIP). Beyond, the same range
search cell by cell, with a bound that keeps it exact: the rows are split into Voronoi cells (k-means on a
sample), and a row x of cell a is searched in cell b only when
    |x - c_b|² - |x - c_a|²  <=  2 |c_a - c_b| eps + slack,   eps = sqrt(2 - 2 threshold)
because every row y of cell b is at least as close to c_b as to c_a, so |x - y| is at least x's distance
to the plane halfway between the two centres, (|x - c_b|² - |x - c_a|²) / (2 |c_a - c_b|) (the bound of
Elkan 2003); a pair at cosine >= threshold is at distance <= eps, so no pair is missed. The bound holds from
both sides, so across two cells only the rows of each within eps of their bisector are searched against each
other. `slack` (1e-3, squared-distance units) covers float32 rounding, 100x over. The work is each row
against its own cell plus the thin borders between neighbouring cells, instead of against all N rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import faiss
import numpy as np

from mixem.errors import ConfigError, DataError

DEFAULT_THRESHOLD = 0.996  # cosine of fingerprints; how it was chosen: README, "Near-duplicates"
BRUTE_MAX = 50_000  # rows up to which one range search of all against all is cheap (N² F: 1.6e11 flops at 50k)
CELL_ROWS = 1000  # rows per cell of the partitioned search
SLACK = 1e-3
MAX_PAIRS = 20_000_000  # more pairs than this means the threshold is far too low for near-duplicates
BLOCK = 16384  # rows per distance block when assigning rows to cells
RESULTS_MAX = 1 << 28  # queries x members per range-search call: bounds what one call can return
QUERIES = (1024, 8192)  # queries per range-search call, at least and at most (fewer per call run slower)


@dataclass
class Duplicates:
    """Pairs (row indices i < j, cosine) at or above the threshold, best first, and their connected groups."""

    threshold: float
    i: np.ndarray  # (P,) int64
    j: np.ndarray  # (P,) int64
    similarity: np.ndarray  # (P,) float32
    group: np.ndarray  # (P,) int32 the group (connected component) of each pair
    groups: list[np.ndarray] = field(default_factory=list)  # rows of each group, largest group first
    how: str = ""
    seconds: float = 0.0

    @property
    def images(self) -> int:
        return int(sum(len(g) for g in self.groups))


class TooManyPairs(DataError):
    """More than MAX_PAIRS pairs reach the threshold: a folder of mostly copies, or a threshold far too low."""


def _brute(v: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) with i < j of every pair at or above the threshold: one range search of all rows against all."""
    rows = np.arange(len(v), dtype=np.int64)
    found: list = []
    _search(v, rows, rows, threshold, found, 0, within=True)
    return _pairs(found)


def _cells(v: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cells: (centres (C, F), distances between centres (C, C), squared norms of the centres (C,))."""
    n_cells = max(2, min(4096, len(v) // CELL_ROWS))
    km = faiss.Kmeans(v.shape[1], n_cells, niter=10, seed=seed, max_points_per_centroid=64, min_points_per_centroid=1)
    km.train(v)
    c = np.ascontiguousarray(km.centroids, dtype=np.float32)
    cc = np.sqrt(np.maximum(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1), 0.0)).astype(np.float32)
    return c, cc, (c * c).sum(1)


def _borders(v, c, cc, c_sq, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each row's cell, and every (row, other cell) whose bisector lies within eps of the row (the bound above),
    as parallel arrays (rows, their own cell, the other cell)."""
    own = np.empty(len(v), np.int64)
    rows, cells = [], []
    for s in range(0, len(v), BLOCK):
        xb = v[s : s + BLOCK]
        d2 = (xb * xb).sum(1, keepdims=True) + c_sq[None] - 2.0 * xb @ c.T  # (B, C)
        a = d2.argmin(1)
        own[s : s + len(xb)] = a
        near = (d2 - d2[np.arange(len(xb)), a][:, None]) <= 2.0 * eps * cc[a] + SLACK
        near[np.arange(len(xb)), a] = False
        r, b = np.nonzero(near)
        rows.append(r + s)
        cells.append(b)
    rows, other = np.concatenate(rows), np.concatenate(cells)
    return own, rows, own[rows], other


def _search(v, queries: np.ndarray, members: np.ndarray, threshold: float, out: list, total: int, within=False) -> int:
    """Range search of queries against members (global row ids); appends the (i, j), i < j, found and returns the
    running count. `within`: queries and members are the same rows, so each pair is kept from its lower row only.
    The queries go in chunks whose results stay bounded (RESULTS_MAX); past MAX_PAIRS it stops with TooManyPairs,
    so a folder of mostly copies costs bounded memory instead of every pair it holds."""
    index = faiss.IndexFlatIP(v.shape[1])
    index.add(v[members])
    chunk = int(np.clip(RESULTS_MAX // max(1, len(members)), *QUERIES))
    for s in range(0, len(queries), chunk):
        qs = queries[s : s + chunk]
        lims, _, hits = index.range_search(v[qs], threshold)
        q = np.repeat(qs, np.diff(lims).astype(np.int64))
        m = members[hits.astype(np.int64)]
        keep = q < m if within else q != m
        q, m = q[keep], m[keep]
        out.append((np.minimum(q, m), np.maximum(q, m)))
        total += len(q)
        if total > MAX_PAIRS:
            raise TooManyPairs(
                f"more than {MAX_PAIRS:,} pairs reach cosine {threshold}: a folder of mostly copies (remove them), "
                "or a threshold too low for near-duplicates (raise --dup-threshold)"
            )
    return total


def _pairs(found: list) -> tuple[np.ndarray, np.ndarray]:
    i = np.concatenate([f[0] for f in found]) if found else np.zeros(0, np.int64)
    j = np.concatenate([f[1] for f in found]) if found else np.zeros(0, np.int64)
    return i, j


def _partitioned(v: np.ndarray, threshold: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every row against its own cell, then, for each pair of neighbouring cells a < b, the rows of a near their
    bisector against the rows of b near it: a pair x in a, y in b at distance <= eps crosses the bisector, so
    both lie within eps of it (the bound holds from both sides)."""
    eps = float(np.sqrt(max(0.0, 2.0 - 2.0 * threshold)))
    c, cc, c_sq = _cells(v, seed)
    own, rows, mine, other = _borders(v, c, cc, c_sq, eps)
    found, total = [], 0
    order = np.argsort(own, kind="stable")
    bounds = np.searchsorted(own[order], np.arange(len(c) + 1))
    for b in range(len(c)):
        members = order[bounds[b] : bounds[b + 1]]
        if len(members) > 1:
            total = _search(v, members, members, threshold, found, total, within=True)
    lo, hi = np.minimum(mine, other), np.maximum(mine, other)
    key = lo * len(c) + hi
    side = mine == lo  # True: the row lies in the lower-numbered cell of the pair
    order = np.lexsort((side, key))
    key, side, rows = key[order], side[order], rows[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], len(key)]
    for s, e in zip(starts.tolist(), ends.tolist()):
        split = s + int(np.searchsorted(side[s:e], True))  # side is sorted within the pair: False, then True
        if s < split < e:
            total = _search(v, rows[split:e], rows[s:split], threshold, found, total)
    i, j = _pairs(found)
    return i, j  # each pair once: within a cell from its lower row, across two cells from one side only


def find(
    fingerprints: np.ndarray, threshold: float = DEFAULT_THRESHOLD, seed: int = 0, brute_max: int = BRUTE_MAX
) -> Duplicates:
    """Every pair of rows whose descriptors have cosine >= threshold (zero rows never pair), with its groups;
    more than brute_max rows are searched cell by cell (exact, see the module docstring)."""
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"the near-duplicate threshold is a cosine in (0, 1], got {threshold}")
    t0 = time.perf_counter()
    v = np.ascontiguousarray(fingerprints, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    v = np.where(norms > 0, v / np.maximum(norms, 1e-12), 0.0).astype(np.float32)  # float16 rounding undone
    if len(v) <= brute_max:
        i, j = _brute(v, threshold)
        how = "FAISS range search, all rows against all (IndexFlatIP)"
    else:
        i, j = _partitioned(v, threshold, seed)
        how = "FAISS range search per Voronoi cell, exact by the bisector bound (mixem.duplicates)"
    sim = np.einsum("ij,ij->i", v[i], v[j]).astype(np.float32)
    keep = sim >= threshold  # one rounding for every pair, whichever search found it
    i, j, sim = i[keep], j[keep], sim[keep]
    order = np.lexsort((j, i, -sim))
    i, j, sim = i[order], j[order], sim[order]
    group, groups = _groups(i, j, len(v))
    return Duplicates(threshold, i, j, sim, group, groups, how, round(time.perf_counter() - t0, 3))


def _groups(i: np.ndarray, j: np.ndarray, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Connected components of the pair graph: each pair's group id, and each group's rows, largest first."""
    if len(i) == 0:
        return np.zeros(0, np.int32), []
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rows = np.unique(np.concatenate([i, j]))
    local = np.searchsorted(rows, np.concatenate([i, j]))
    graph = coo_matrix((np.ones(len(i)), (local[: len(i)], local[len(i) :])), shape=(len(rows), len(rows)))
    _, label = connected_components(graph, directed=False)
    sizes = np.bincount(label)
    rank = np.empty_like(sizes)
    rank[np.lexsort((np.arange(len(sizes)), -sizes))] = np.arange(len(sizes))  # group 0 is the largest
    label = rank[label]
    order = np.argsort(label, kind="stable")
    groups = np.split(rows[order], np.cumsum(np.bincount(label))[:-1])
    return label[local[: len(i)]].astype(np.int32), groups
