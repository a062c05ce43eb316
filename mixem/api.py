"""The Python API that the command line is a thin shell over: train, embed_folder, classify, cluster (and load).

Each function runs what its command runs and returns a result object read back from the checked outputs, so
code gets arrays and tables, not only files.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixem.errors import ConfigError


@dataclass
class TrainResult:
    """A finished `train`: where it is, and how its classes scored (when the data had labels)."""

    run_dir: Path
    checkpoint: Path  # the newest checkpoint (the refined one after refinement)
    headline: dict | None  # the headline row: name, acc, nmi, ari (None without labels or evaluation)
    metrics: dict  # metrics.json of the run ({} without labels or evaluation)
    summary: dict  # what the command printed as its summary

    def load(self, engine: str = "torch", device: str = "auto"):
        """The trained model, ready to embed and predict (mixem.load)."""
        from mixem.predictor import load

        return load(self.run_dir, engine=engine, device=device)


@dataclass
class EmbedResult:
    """A finished (or, under torchrun, partly finished) embedding run."""

    out: Path
    summary: dict  # counts: files, embedded, skipped (by status), shards, speed

    @property
    def complete(self) -> bool:
        return bool(self.summary.get("complete"))

    def embeddings(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids (N,), image paths (N,), vectors (N, D) float32) of every readable image, in id order."""
        from mixem import rundir, shards

        m = rundir.load_complete(self.out)
        x, cols = shards.read_ok(self.out, m.n_shards, ("id", "image_path"))
        return cols["id"], cols["image_path"], x


@dataclass
class ClassifyResult(EmbedResult):
    """A classify run: an embedding run plus each readable file's class (classes.parquet)."""

    classes: object = None  # pyarrow.Table: image_path, id, class, [class_name,] probability, distance


@dataclass
class ClusterResult:
    """A cluster run, read back from its checked output set."""

    out: Path
    k: int
    assignments: object  # pyarrow.Table: image_path, id, cluster, distance (squared L2 to the centre)
    centroids: np.ndarray  # (k, D) float32
    metrics: dict  # metrics.json: settings, sizes, ACC/NMI/ARI with labels, the k scan, duplicates
    duplicates: object | None = None  # pyarrow.Table: path_a, path_b, similarity, id_a, id_b, group
    report: Path | None = None
    summary: dict = field(default_factory=dict)


def _split_overrides(overrides: dict) -> tuple[dict, dict]:
    """Keyword overrides of train() into model-config and train-config fields; an unknown name is an error."""
    from mixem.config import MixEMConfig, TrainConfig

    model_fields = {f.name for f in dataclasses.fields(MixEMConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"data", "out"}
    unknown = sorted(set(overrides) - model_fields - train_fields)
    if unknown:
        raise ConfigError(
            f"mixem.train: unknown setting {unknown[0]!r}; use a field of MixEMConfig or TrainConfig (mixem.config)"
        )
    model = {k: v for k, v in overrides.items() if k in model_fields}
    return model, {k: v for k, v in overrides.items() if k not in model_fields}


def train(
    data: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    *,
    preset: str = "auto",
    config: str | os.PathLike | None = None,
    resume: bool = False,
    evaluate: bool = True,
    quiet: bool = True,
    json_log: str | os.PathLike | None = None,
    **overrides,
) -> TrainResult:
    """Train (then refine) on `data` (default: the embedded Fashion-MNIST split) into `out`, as `mixem-fast train`.

    overrides: any field of MixEMConfig or TrainConfig (epochs=2, batch_size=64, refine=False, ...); None keeps
    the preset's value."""
    from mixem.files import read_json
    from mixem.session import train_command

    model_over, train_over = _split_overrides({k: v for k, v in overrides.items() if v is not None})
    train_over.update(data=None if data is None else str(data), out=None if out is None else str(out))
    summary = train_command(
        preset, Path(config) if config else None, model_over, train_over,
        resume=resume, evaluate=evaluate, quiet=quiet, json_log=json_log,
    )  # fmt: skip
    run_dir = Path(summary["run_dir"])
    metrics = read_json(run_dir / "metrics.json", "metrics file") if (run_dir / "metrics.json").is_file() else {}
    return TrainResult(run_dir, Path(summary["checkpoint"]), summary.get("headline"), metrics, summary)


def _embed_options(engine: str, device: str, options: dict):
    from mixem.config import replace
    from mixem.embed import EmbedOptions

    known = {f.name for f in dataclasses.fields(EmbedOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown embedding option {unknown[0]!r}; choose from {', '.join(sorted(known))}")
    return replace(EmbedOptions(engine=engine), device=device, **options)


def embed_folder(
    model: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    engine: str = "torch",
    device: str = "auto",
    quiet: bool = True,
    json_log: str | os.PathLike | None = None,
    **options,
) -> EmbedResult:
    """Embed every image under `images` into resumable shards in `out` (`mixem-fast embed`); options: the fields
    of mixem.embed.EmbedOptions (batch_size, shard_size, workers, features, update, follow_links, ...)."""
    from mixem.embed import embed_folder as run
    from mixem.runlog import RunLog

    summary = run(str(model), images, out, _embed_options(engine, device, options), RunLog(json_log, quiet=quiet))
    return EmbedResult(Path(out), summary)


def classify(
    model: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    engine: str = "torch",
    device: str = "auto",
    quiet: bool = True,
    json_log: str | os.PathLike | None = None,
    **options,
) -> ClassifyResult:
    """The class of every image under `images` (`mixem-fast classify`): an embedding run in `out` plus
    classes.parquet; options as for embed_folder."""
    from mixem.classification import classify_folder, read_classified
    from mixem.runlog import RunLog

    opts = _embed_options(engine, device, options)
    summary = classify_folder(str(model), images, out, opts, RunLog(json_log, quiet=quiet))
    table = read_classified(out) if summary.get("classes") else None
    return ClassifyResult(Path(out), summary, table)


def cluster(
    run: str | os.PathLike,
    k: int | str | None = None,
    *,
    centroids: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
    quiet: bool = True,
    json_log: str | os.PathLike | None = None,
    **options,
) -> ClusterResult:
    """Cluster an embedding run (`mixem-fast cluster`): k clusters, k="auto" (a silhouette scan over k_range), or
    every image assigned to existing `centroids` (an .npy, e.g. another run's centroids.npy). options: init,
    spherical, niter, seed, max_points_per_centroid, k_range, report, per_cluster, duplicates (a cosine
    threshold, or None for no near-duplicate search)."""
    import json

    import pyarrow.parquet as pq

    from mixem import manifest, rundir
    from mixem.clustering import cluster_run
    from mixem.runlog import RunLog

    run = Path(run)
    summary = cluster_run(
        run, k, centroids=centroids, labels_file=Path(labels) if labels else None,
        log=RunLog(json_log, quiet=quiet), **options,
    )  # fmt: skip
    rec = rundir.read_clusters(run, manifest.load(run))
    files = rec["files"]
    return ClusterResult(
        out=run,
        k=summary["k"],
        assignments=pq.read_table(run / rundir.CLUSTERS),
        centroids=np.load(run / rundir.CENTROIDS, allow_pickle=False),
        metrics=json.loads((run / rundir.METRICS).read_text(encoding="utf-8")),
        duplicates=pq.read_table(run / rundir.DUPLICATES) if rundir.DUPLICATES in files else None,
        report=run / rundir.REPORT if rundir.REPORT in files else None,
        summary=summary,
    )
