"""An embedding run's output folder: its file names, its owner claim, and the checks that it is complete and whole."""

from __future__ import annotations

from pathlib import Path

from mixem import manifest, outputs, owner, shards
from mixem.errors import DataError

# Written by `cluster` beside the shards as one output set (mixem.outputs), recorded in cluster.set.json;
# read by `search` and the report.
CLUSTERS, CENTROIDS, INDEX = "clusters.parquet", "centroids.npy", "index.faiss"
METRICS, REPORT = "metrics.json", "report.html"
CLUSTER_SET = "cluster"
GENERATION_KEY = b"mixem.generation"  # clusters.parquet's schema metadata: the output set it belongs to
SUMMARY, BAD_TXT, BAD_JSONL = "summary.json", "bad_files.txt", "bad_files.jsonl"
DUPLICATES = "duplicates.parquet"  # cluster's near-duplicate pairs (mixem.duplicates), in the cluster set
# Written by `classify` beside the shards as its own output set, recorded in classify.set.json.
CLASSIFIED, CLASSIFY_SET = "classes.parquet", "classify"
# The top-level files of an embedding folder that are written whole (their temporaries are ours to clean).
TOP_FILES = (manifest.MANIFEST, manifest.FILES, SUMMARY, BAD_TXT, BAD_JSONL, CLUSTERS, CENTROIDS, INDEX, METRICS)
TOP_FILES += (REPORT, DUPLICATES, CLASSIFIED, *(outputs.record_path(".", n).name for n in (CLUSTER_SET, CLASSIFY_SET)))
KIND = "embed"


def claim(out: Path, command: str, job: str = ""):
    """Own an embedding folder (owner.claim): new, empty, or an embedding run; the listing is worth keeping."""
    return owner.claim(out, KIND, command=command, legacy=(manifest.MANIFEST,), keep=(manifest.MANIFEST,), job=job)


def load_complete(out: Path) -> manifest.Manifest:
    """The manifest of a finished embedding run whose every shard checks out, or a one-line error saying why not."""
    m = manifest.load(out)
    if m is None:
        raise DataError(f"{out}: no {manifest.MANIFEST}; run `mixem-fast embed MODEL IMAGES --out {out}` first")
    digests = m.shard_digests(out)
    bad = [(s, why) for s in range(m.n_shards) if (why := shards.check(out, m, s, digests[s])) is not None]
    if bad:
        s, why = bad[0]
        raise DataError(
            f"{out}: {m.n_shards - len(bad)} of {m.n_shards} shards are done (shard {s:05d}: {why}); "
            "rerun the embed command to finish it"
        )
    return m


def cluster_tie(m: manifest.Manifest) -> dict:
    """What cluster outputs are computed from: this run's settings and listing (an --update makes them stale)."""
    return {"run_id": m.run_id, "files_sha256": m.files_sha256}


def read_clusters(out: Path, m: manifest.Manifest) -> dict:
    """The record of this run's complete cluster outputs (outputs.read_set), or a one-line error."""
    return outputs.read_set(out, CLUSTER_SET, cluster_tie(m), rerun=f"mixem-fast cluster {out} --k K")
