"""The files of an output folder of `embed` and `cluster`, by name, and the check that an embedding run is complete."""

from __future__ import annotations

from pathlib import Path

from mixem import manifest, shards
from mixem.errors import DataError

# Written by `cluster` beside the shards; read by `search` and the report.
CLUSTERS, CENTROIDS, INDEX = "clusters.parquet", "centroids.npy", "index.faiss"
METRICS, REPORT = "metrics.json", "report.html"


def load_complete(out: Path) -> manifest.Manifest:
    """The manifest of a finished embedding run, or a one-line error saying what is missing."""
    m = manifest.load(out)
    if m is None:
        raise DataError(f"{out}: no {manifest.MANIFEST}; run `mixem-fast embed MODEL IMAGES --out {out}` first")
    done = shards.done_shards(out, m.n_shards)
    if len(done) < m.n_shards:
        raise DataError(f"{out}: {len(done)} of {m.n_shards} shards are done; rerun the embed command to finish it")
    return m
