"""The cluster command: FAISS k-means over an embedding run's shards, its outputs, metrics and report."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mixem import owner, rundir, shards
from mixem.config import KMEANS_INITS
from mixem.errors import ConfigError, DataError
from mixem.kmeans import describe_backend, kmeans, l2_normalize, resolve_backend
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
    k: int,
    *,
    init: str = "mixture",
    spherical: bool = False,
    niter: int = 25,
    seed: int = 0,
    max_points_per_centroid: int | None = None,
    labels_file: Path | None = None,
    gpu: str | bool = "auto",
    report: bool = True,
    per_cluster: int = 24,
    log: RunLog | None = None,
) -> dict:
    """Cluster every embedded image of run `out` into k groups; writes the outputs beside the shards as one set.

    The folder is owned for the whole run (no embed or second cluster meanwhile), and the outputs are
    committed together (mixem.outputs): a killed or failed run leaves the previous set whole, or none.
    """
    log = log or RunLog(quiet=True)
    out = Path(out)
    if init not in KMEANS_INITS:
        raise ConfigError(f"--init must be one of {', '.join(KMEANS_INITS)}, got {init!r}")
    load_complete(out)  # before claiming it: a folder that is no embedding run is never created or locked
    with rundir.claim(out, "cluster"):
        owner.clean_temps(out, rundir.TOP_FILES)  # what a killed cluster (or embed) left half-written
        m = load_complete(out)  # again, now that no embed can change it
        t0 = time.perf_counter()
        x, cols = shards.read_ok(out, m.n_shards)
        x = l2_normalize(x) if spherical else x  # stored rows are unit already; fp16 rounding moves them ~1e-3
        N, D = x.shape
        if not 1 <= k <= N:
            raise ConfigError(f"--k must be between 1 and the {N} embedded images, got {k}")
        t_read = time.perf_counter() - t0
        how, dev = resolve_backend(gpu, spherical=spherical)  # may import torch (~1 s): after the read is timed
        where = describe_backend(how, dev) + (" (no GPU visible to faiss or torch)" if dev == "cpu" else "")
        log.print(
            f"{N:,} vectors of {D} dims from {m.n_shards} shards ({t_read:.1f} s); "
            f"k-means k={k}, init {init}, {'spherical, ' if spherical else ''}{where}"
        )
        # init "mixture" (the default) is MIX'EM's start: the mean of each argmax-pi group (empty ones by k-means++).
        res = kmeans(
            x,
            k,
            init=init,
            mixture_probs=cols["mixture_probs"],
            spherical=spherical,
            niter=niter,
            seed=seed,
            max_points_per_centroid=max_points_per_centroid,
            gpu=gpu,
            overwrite_x=True,  # x is ours: scikit-learn may centre it in place instead of copying it
        )
        t_km = time.perf_counter() - t0
        if res.sampled:
            log.print(
                f"k-means trained on a random {res.n_points_used:,} of {N:,} points (--max-points-per-centroid); "
                "every point is still assigned"
            )
        rel = _rel(cols["image_path"], m.root)
        y, label_source, classes = find_labels(rel, labels_file)
        settings = dict(k=k, init=init, spherical=spherical, niter=niter, seed=seed)
        metrics = _metrics(settings, res, m.features, cols, y, label_source, seconds=t_km)
        with OutputSet(out, CLUSTER_SET, tie=rundir.cluster_tie(m)) as outs:
            metrics["generation"] = outs.generation  # metrics.json, clusters.parquet and the record share it
            _write_assignments(outs, x, cols, res)
            outs.write(METRICS, lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
            if report:
                from mixem.report import write_report

                page = (rel, m.root, res.assign, res.distances, k, metrics, y, classes)
                outs.write(
                    REPORT, lambda p: write_report(p, *page, per_cluster=per_cluster, follow_links=m.follow_links)
                )
    summary = {k_: metrics[k_] for k_ in ("k", "init", "points", "objective", "kmeans", "sampled", "empty_clusters")}
    summary.update({key: metrics[key] for key in ("acc", "nmi", "ari", "labels") if key in metrics})
    summary["outputs"] = [str(out / f) for f in (CLUSTERS, CENTROIDS, INDEX, METRICS) + ((REPORT,) if report else ())]
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
    outs.write(CENTROIDS, lambda p: _save_npy(p, res.centroids))
    # Inner product on unit rows = cosine; ids are manifest ids, so a hit maps back to files.parquet.
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(x.shape[1]))
    index.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), ids.astype(np.int64))
    outs.write(INDEX, lambda p: faiss.write_index(index, str(p)))


def _save_npy(path: Path, a: np.ndarray):
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
        np.save(f, a)
