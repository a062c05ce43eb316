"""The commands over image folders: embed, classify, cluster, search (each a thin shell over mixem's Python API)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mixem.cli.errors import one_line_errors
from mixem.cli.options import ClusterInit, Device, EmbedEngine, EmbedFeatures, JsonLog, Quiet, app
from mixem.errors import ConfigError

ModelPath = Annotated[
    Path, typer.Argument(help="Checkpoint/run dir (torch), model.onnx or export dir (onnx), model.plan (trt).")
]
Images = Annotated[Path, typer.Argument(help="Image folder, searched recursively.")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output directory (shards, manifest, summary).")]
Engine = Annotated[EmbedEngine, typer.Option("--engine", help="Inference engine.")]
BatchSize = Annotated[int | None, typer.Option("--batch-size", "-b", help="Images per engine call.")]
ShardSize = Annotated[int | None, typer.Option("--shard-size", help="Images per output shard.")]
Workers = Annotated[int | None, typer.Option("--workers", help="Decode threads (0: one per CPU).")]
Decoder = Annotated[
    str | None,
    typer.Option(
        "--decoder", help="auto (nvjpeg on a GPU, else pil) | pil | simplejpeg (faster JPEGs on a CPU) | nvjpeg."
    ),
]
Update = Annotated[
    bool,
    typer.Option(
        "--update", help="The folder changed since --out listed it: embed new and changed files, keep the rest."
    ),
]
FollowLinks = Annotated[
    bool, typer.Option("--follow-links", help="Follow links that lead outside the image folder (off: left out).")
]


def _stream(run, model, images, out, engine, device, quiet, json_log, **options) -> dict:
    """embed or classify: OpenMP made passive, rank > 0 quiet, Ctrl-C said plainly; returns the summary."""
    from mixem.runtime import passive_openmp, torchrun_env

    passive_openmp()  # before torch loads: the decode threads need the cores between engine calls
    rank, _, _ = torchrun_env()
    try:
        return run(model, images, out, engine=engine.value, device=device, quiet=quiet or rank > 0,
                   json_log=json_log, **options).summary  # fmt: skip
    except KeyboardInterrupt:
        typer.echo("interrupted; finished shards are kept: run the same command again to resume", err=True)
        raise typer.Exit(130) from None


@app.command()
@one_line_errors
def embed(
    model: ModelPath,
    images: Images,
    out: Out,
    engine: Engine = EmbedEngine.torch,
    features: Annotated[
        EmbedFeatures,
        typer.Option(
            "--features",
            help="What to store: the mixture embedding, or backbone features (onnx/trt: export with --features).",
        ),
    ] = EmbedFeatures.embedding,
    batch_size: BatchSize = None,
    shard_size: ShardSize = None,
    workers: Workers = None,
    decoder: Decoder = None,
    update: Update = False,
    follow_links: FollowLinks = False,
    device: Device = None,
    quiet: Quiet = False,
    json_log: JsonLog = None,
):
    """Embed every image of a folder into resumable shards; rerun the same command to resume, torchrun to split."""
    from mixem.api import embed_folder

    summary = _stream(embed_folder, model, images, out, engine, device, quiet, json_log, features=features.value,
                      batch_size=batch_size, shard_size=shard_size, workers=workers, decoder=decoder, update=update,
                      follow_links=follow_links)  # fmt: skip
    typer.echo(json.dumps(summary, indent=2))


@app.command()
@one_line_errors
def classify(
    model: ModelPath,
    images: Images,
    out: Out,
    engine: Engine = EmbedEngine.torch,
    batch_size: BatchSize = None,
    shard_size: ShardSize = None,
    workers: Workers = None,
    decoder: Decoder = None,
    update: Update = False,
    follow_links: FollowLinks = False,
    device: Device = None,
    quiet: Quiet = False,
    json_log: JsonLog = None,
):
    """The class of every image of a folder (classes.parquet: class, probability, distance to the class centre),
    through embed's resumable shards; bad files are listed in bad_files.txt; rerun the same command to resume."""
    from mixem.api import classify as run

    summary = _stream(run, model, images, out, engine, device, quiet, json_log, batch_size=batch_size,
                      shard_size=shard_size, workers=workers, decoder=decoder, update=update,
                      follow_links=follow_links)  # fmt: skip
    typer.echo(json.dumps(summary, indent=2))


def _k(text: str | None):
    if text is None or text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--k must be a number of clusters or 'auto', got {text!r}") from None


@app.command()
@one_line_errors
def cluster(
    run: Annotated[Path, typer.Argument(help="Output directory of `mixem-fast embed` (or classify).")],
    k: Annotated[str | None, typer.Option("--k", help="Number of clusters, or 'auto' (see --k-range).")] = None,
    k_range: Annotated[
        str, typer.Option("--k-range", help="--k auto: the range scanned, A:B (silhouette on a sample).")
    ] = "2:20",
    centroids: Annotated[
        Path | None,
        typer.Option(
            "--centroids",
            help="Assign every image to these (k, D) centroids (e.g. another run's centroids.npy) instead of k-means.",
        ),  # fmt: skip
    ] = None,
    init: Annotated[
        ClusterInit, typer.Option("--init", help="mixture: MIX'EM's argmax-pi group means.")
    ] = ClusterInit.mixture,
    spherical: Annotated[bool, typer.Option("--spherical", help="Unit-norm centroids, cosine assignment.")] = False,
    niter: Annotated[int, typer.Option("--niter", help="Lloyd iterations.")] = 25,
    max_points: Annotated[
        int | None,
        typer.Option("--max-points-per-centroid", help="Train on a random k*N subset (default: every point)."),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="CSV of 'relative/path,label' to score against (default: sub-folder names when all images have one).",
        ),
    ] = None,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Write report.html.")] = True,
    duplicates: Annotated[
        bool, typer.Option("--duplicates/--no-duplicates", help="Find near-duplicate images (duplicates.parquet).")
    ] = True,
    dup_threshold: Annotated[
        float | None, typer.Option("--dup-threshold", help="Cosine of fingerprints that makes a pair (default 0.996).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for k-means.")] = 0,
    quiet: Quiet = False,
    json_log: JsonLog = None,
):
    """Cluster an embedding run (FAISS k-means, --k auto, or --centroids); write clusters.parquet, centroids,
    index, duplicates, metrics and report.html."""
    from mixem.runtime import passive_openmp

    passive_openmp()  # before faiss loads OpenMP
    from mixem.api import cluster as run_cluster
    from mixem.duplicates import DEFAULT_THRESHOLD

    threshold = (DEFAULT_THRESHOLD if dup_threshold is None else dup_threshold) if duplicates else None
    result = run_cluster(run, _k(k), centroids=centroids, labels=labels, quiet=quiet, json_log=json_log,
                         k_range=k_range, init=init.value, spherical=spherical, niter=niter, seed=seed,
                         max_points_per_centroid=max_points, report=report, duplicates=threshold)  # fmt: skip
    typer.echo(json.dumps(result.summary, indent=2))


@app.command()
@one_line_errors
def search(
    run: Annotated[Path, typer.Argument(help="A clustered embedding run directory.")],
    image: Annotated[Path, typer.Argument(help="Query image.")],
    k: Annotated[int, typer.Option("-k", "--top", help="How many neighbours.")] = 10,
    model: Annotated[Path | None, typer.Option("--model", help="Model path, if it moved since embedding.")] = None,
    device: Device = None,
):
    """Print the images of a run nearest to IMAGE (cosine similarity), best first, as JSON lines."""
    from mixem.search import search as run_search

    for hit in run_search(run, image, k, model=str(model) if model else None, device=device or "auto"):
        typer.echo(json.dumps(hit))
