"""The cluster command: k-means (mixem.kmeans) over an embedding run's shards, its outputs, metrics and report."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mixem import kscan, owner, rundir, shards
from mixem.config import KMEANS_INITS
from mixem.duplicates import DEFAULT_THRESHOLD, TooManyPairs
from mixem.duplicates import find as find_duplicates
from mixem.errors import ConfigError, DataError
from mixem.files import write_npy
from mixem.kmeans import KMeansResult, describe_backend, kmeans, l2_normalize, resolve_backend, sq_distances
from mixem.metrics import clustering_metrics
from mixem.outputs import OutputSet
from mixem.rundir import CENTROIDS, CLUSTER_SET, CLUSTERS, GENERATION_KEY, INDEX, METRICS, REPORT, load_complete
from mixem.runlog import RunLog

CLUSTERS_ROW_GROUP = 65536  # rows per parquet row group: `search` reads only the groups holding its hits


def _rel(paths: np.ndarray, root: str) -> list[str]:
    cut = len(root) + 1
    return [p[cut:] if p.startswith(root + "/") else p for p in paths]


def find_labels(rel: list[str], labels_file: Path | None):
    """Labels per row: from a CSV of (path relative to the image folder, label) when given, else from
    first-level sub-folder names when every image lies in one. (labels, where from, class names) or Nones."""
    if labels_file is not None:
        if not Path(labels_file).is_file():
            raise DataError(f"{labels_file}: labels file not found")
        try:
            with open(labels_file, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.reader(f) if r]
        except UnicodeDecodeError as e:
            raise DataError(
                f"{labels_file}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8 CSV"
            ) from None
        except csv.Error as e:
            raise DataError(f"{labels_file}: not a CSV file ({e}); give 'relative/path,label' lines") from None
        if rows and rows[0][:2] == ["path", "label"]:
            rows = rows[1:]
        table = {r[0]: r[1] for r in rows if len(r) >= 2}
        missing = [p for p in rel if p not in table]
        if missing:
            raise DataError(
                f"{labels_file}: no label for {len(missing)} of {len(rel)} images (first: {missing[0]}); "
                "give one 'relative/path,label' line per image"
            )
        names = [table[p] for p in rel]
        source = str(labels_file)
    elif rel and all("/" in p for p in rel):
        names = [p.split("/", 1)[0] for p in rel]
        source = "sub-folder names"
    else:
        return None, None, None
    classes, y = np.unique(np.asarray(names), return_inverse=True)
    return y.astype(np.int64), source, classes.tolist()


def cluster_run(
    out: str | Path,
    k: int | str | None = None,
    *,
    centroids: str | Path | None = None,
    k_range: str | tuple[int, int] = kscan.DEFAULT_RANGE,
    init: str = "mixture",
    spherical: bool = False,
    niter: int = 25,
    seed: int = 0,
    max_points_per_centroid: int | None = None,
    labels_file: Path | None = None,
    gpu: str | bool = "auto",
    report: bool = True,
    per_cluster: int = 24,
    duplicates: float | None = DEFAULT_THRESHOLD,
    log: RunLog | None = None,
) -> dict:
    """Cluster every embedded image of run `out`; writes the outputs beside the shards as one set.

    k: the number of clusters, or "auto" (scan k_range, kscan); centroids: an .npy of (k, D) centroids (another
    run's centroids.npy) to assign every image to, instead of k-means. duplicates: the cosine threshold of the
    near-duplicate search (mixem.duplicates; None: none). The folder is owned for the whole run (no embed or
    second cluster meanwhile), and the outputs are committed together (mixem.outputs): a killed or failed run
    leaves the previous set whole, or none.
    """
    log = log or RunLog(quiet=True)
    out = Path(out)
    _check_options(k, centroids, init)
    k_range = kscan.parse_range(k_range)
    load_complete(out)  # before claiming it: a folder that is no embedding run is never created or locked
    with rundir.claim(out, "cluster"):
        owner.clean_temps(out, rundir.TOP_FILES)  # what a killed cluster (or embed) left half-written
        m = load_complete(out)  # again, now that no embed can change it
        t0 = time.perf_counter()
        x, cols = shards.read_ok(out, m.n_shards)
        x = l2_normalize(x) if spherical else x  # stored rows are unit already; fp16 rounding moves them ~1e-3
        note = f"{len(x):,} vectors of {x.shape[1]} dims from {m.n_shards} shards ({time.perf_counter() - t0:.1f} s)"
        opts = dict(init=init, spherical=spherical, niter=niter, seed=seed, mppc=max_points_per_centroid, gpu=gpu)
        opts["note"] = note
        res, k, scan, settings = _solve(x, cols, k, centroids, k_range, opts, log)
        t_km = time.perf_counter() - t0
        rel = _rel(cols["image_path"], m.root)
        y, label_source, classes = find_labels(rel, labels_file)
        metrics = _metrics(settings, res, m.features, cols, y, label_source, seconds=t_km)
        dup = _duplicates(out, m, duplicates, seed, log)
        metrics.update(k_scan=scan, duplicates=_dup_summary(dup, duplicates))
        dup = None if isinstance(dup, str) else dup
        metrics.update(seconds_k_scan=scan.pop("seconds") if scan else None, seconds_duplicates=dup and dup.seconds)
        with OutputSet(out, CLUSTER_SET, tie=rundir.cluster_tie(m)) as outs:
            metrics["generation"] = outs.generation  # metrics.json, clusters.parquet and the record share it
            _write_assignments(outs, x, cols, res)
            if dup is not None:
                outs.write(rundir.DUPLICATES, lambda p: _write_pairs(p, dup, rel, cols["id"]))
            if report:
                from mixem.report import Page, write_report

                page = Page(rel, m.root, x, res, metrics, y, classes, dup, per_cluster, m.follow_links)
                outs.write(REPORT, lambda p: metrics.update(seconds_report=write_report(p, page)))
            outs.write(METRICS, lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
    return _summary(out, metrics, report, dup is not None, log)


def _check_options(k, centroids, init: str) -> None:
    if init not in KMEANS_INITS:
        raise ConfigError(f"--init must be one of {', '.join(KMEANS_INITS)}, got {init!r}")
    if (k is None) == (centroids is None):
        raise ConfigError("give --k K (or --k auto), or --centroids FILE to assign to existing centroids; not both")
    if isinstance(k, str) and k != "auto":
        raise ConfigError(f"--k must be a number of clusters or 'auto', got {k!r}")


def _solve(x, cols, k, centroids, k_range, opts: dict, log: RunLog):
    """(KMeansResult, k, the k scan or None, the settings metrics.json records) for the chosen way."""
    N = len(x)
    if centroids is not None:
        res = assign_to(x, load_centroids(centroids, x.shape[1]))
        log.print(f"{opts['note']}; assigned to the {len(res.centroids)} centroids of {centroids} (no k-means)")
        return (
            res,
            len(res.centroids),
            None,
            dict(k=len(res.centroids), init="given centroids", centroids=str(centroids)),
        )
    scan = None
    if k == "auto":
        scan = kscan.scan(x, k_range, opts["seed"], opts["gpu"])
        k = scan["best"]
        log.print(
            f"{opts['note']}; --k auto: k = {k} has the highest {scan['criterion']} of k = {k_range[0]}..{scan['range'][1]}"
        )
    if not 1 <= k <= N:
        raise ConfigError(f"--k must be between 1 and the {N} embedded images, got {k}")
    how, dev = resolve_backend(opts["gpu"], spherical=opts["spherical"])  # may import torch (~1 s)
    where = describe_backend(how, dev) + (" (no GPU visible to faiss or torch)" if dev == "cpu" else "")
    log.print(
        f"{'' if scan else opts['note'] + '; '}k-means k={k}, init {opts['init']}, {'spherical, ' if opts['spherical'] else ''}{where}"
    )
    # init "mixture" (the default) is MIX'EM's start: the mean of each argmax-pi group (empty ones by k-means++).
    res = kmeans(
        x,
        k,
        init=opts["init"],
        mixture_probs=cols["mixture_probs"],
        spherical=opts["spherical"],
        niter=opts["niter"],
        seed=opts["seed"],
        max_points_per_centroid=opts["mppc"],
        gpu=opts["gpu"],
        overwrite_x=True,  # x is ours: scikit-learn may centre it in place instead of copying it
    )
    if res.sampled:
        log.print(
            f"k-means trained on a random {res.n_points_used:,} of {N:,} points (--max-points-per-centroid); "
            "every point is still assigned"
        )
    keys = ("init", "spherical", "niter", "seed")
    return res, k, scan, dict(k=k, **{key: opts[key] for key in keys}, **({"k_auto": True} if scan else {}))


def load_centroids(path: str | Path, dim: int) -> np.ndarray:
    """(k, dim) float32 finite centroids from an .npy file, or a one-line error naming it."""
    path = Path(path)
    try:
        c = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npy of centroids ({e})") from None
    if c.ndim != 2 or c.shape[1] != dim or len(c) < 1 or not np.issubdtype(c.dtype, np.floating):
        raise DataError(
            f"{path}: holds {c.dtype} {c.shape}, not (k, {dim}) floats: centroids of another model or features"
        )
    if not np.isfinite(c).all():
        raise DataError(f"{path}: holds NaN or infinite centroids")
    return np.ascontiguousarray(c, dtype=np.float32)


def assign_to(x: np.ndarray, centroids: np.ndarray) -> KMeansResult:
    """Every point's nearest centroid (squared L2, as k-means assigns): a k-means result with no iterations."""
    assign = faiss.knn(np.ascontiguousarray(x, dtype=np.float32), centroids, 1)[1][:, 0].astype(np.int64)
    dist = sq_distances(x, centroids, assign)
    obj = float(dist.sum(dtype=np.float64))
    return KMeansResult(centroids, assign, dist, obj, "cpu", False, len(x), backend="given centroids")


def _duplicates(out: Path, m, threshold: float | None, seed: int, log: RunLog):
    """The near-duplicate pairs of the run's fingerprints; None (not asked for, or a run made before them); or
    why there are none (a str: more pairs than any near-duplicate list should hold)."""
    if threshold is None:
        return None
    fps = shards.read_fingerprints(out, m.n_shards)
    if fps is None:
        log.print(f"{out}: no fingerprints (embedded by an older mixem-fast): no near-duplicates; embed again for them")
        return None
    try:
        dup = find_duplicates(fps, threshold, seed=seed)
    except TooManyPairs as e:  # the clusters still count: said, and written down, not fatal
        log.print(f"near-duplicates: none written: {e}")
        return str(e)
    log.print(
        f"near-duplicates (cosine >= {threshold} of fingerprints): {len(dup.i):,} pairs in {len(dup.groups):,} "
        f"groups of {dup.images:,} images ({dup.seconds:.1f} s)"
    )
    return dup


def _dup_summary(dup, threshold) -> dict | None:
    if dup is None:
        return None if threshold is None else {"threshold": threshold, "available": False}
    if isinstance(dup, str):
        return {"threshold": threshold, "available": False, "why": dup}
    return {"threshold": dup.threshold, "pairs": len(dup.i), "groups": len(dup.groups), "images": dup.images,
            "how": dup.how, "available": True}  # fmt: skip


def _summary(out: Path, metrics: dict, report: bool, dups: bool, log: RunLog) -> dict:
    keys = ("k", "init", "points", "objective", "kmeans", "sampled", "empty_clusters")
    summary = {key: metrics[key] for key in keys}
    summary.update({key: metrics[key] for key in ("acc", "nmi", "ari", "labels", "duplicates") if metrics.get(key)})
    files = (
        (CLUSTERS, CENTROIDS, INDEX, METRICS) + ((rundir.DUPLICATES,) if dups else ()) + ((REPORT,) if report else ())
    )
    summary["outputs"] = [str(out / f) for f in files]
    log.event("cluster", **summary)
    return summary


def _metrics(settings: dict, res, features: str, cols: dict, y, label_source, seconds: float) -> dict:
    """metrics.json: the settings, what k-means did, cluster sizes, and ACC/NMI/ARI when labels exist."""
    N, D = len(res.assign), res.centroids.shape[1]
    sizes = np.bincount(res.assign, minlength=settings["k"])
    metrics = {
        **settings,
        "points": N,
        "dim": D,
        "features": features,
        "objective": res.objective,
        "device": res.device,
        "kmeans": res.where,
        "sampled": res.sampled,
        "points_used_for_training": res.n_points_used,
        "cluster_sizes": sizes.tolist(),
        "empty_clusters": int((sizes == 0).sum()),
        "seconds_kmeans": round(seconds, 3),
    }
    if y is not None:
        metrics.update(
            labels=label_source,
            classes=int(y.max()) + 1,
            **clustering_metrics(y, res.assign),
            mixture_argmax=clustering_metrics(y, cols["mixture_probs"].argmax(1)),
        )
    return metrics


def _write_assignments(outs: OutputSet, x: np.ndarray, cols: dict, res) -> None:
    """clusters.parquet (path, id, cluster, distance per row), centroids.npy and the search index, staged in outs."""
    ids, paths = cols["id"], cols["image_path"]
    table = pa.table(
        {
            "image_path": pa.array(paths, pa.string()),
            "id": pa.array(ids, pa.int64()),
            "cluster": pa.array(res.assign.astype(np.int32)),
            "distance": pa.array(res.distances.astype(np.float32)),
        }
    ).replace_schema_metadata({GENERATION_KEY: outs.generation})
    outs.write(CLUSTERS, lambda p: pq.write_table(table, p, row_group_size=CLUSTERS_ROW_GROUP))
    outs.write(CENTROIDS, lambda p: write_npy(p, res.centroids))
    # Inner product on unit rows = cosine; ids are manifest ids, so a hit maps back to files.parquet.
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(x.shape[1]))
    index.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), ids.astype(np.int64))
    outs.write(INDEX, lambda p: faiss.write_index(index, str(p)))


def _write_pairs(path: Path, dup, rel: list[str], ids: np.ndarray) -> None:
    """duplicates.parquet: one row per pair (both paths relative to the image folder, their cosine, ids, group)."""
    rel = np.asarray(rel, dtype=object)
    table = pa.table(
        {
            "path_a": pa.array(rel[dup.i], pa.string()),
            "path_b": pa.array(rel[dup.j], pa.string()),
            "similarity": pa.array(dup.similarity, pa.float32()),
            "id_a": pa.array(ids[dup.i], pa.int64()),
            "id_b": pa.array(ids[dup.j], pa.int64()),
            "group": pa.array(dup.group, pa.int32()),
        }
    ).replace_schema_metadata({b"mixem.threshold": str(dup.threshold).encode()})
    pq.write_table(table, path)
