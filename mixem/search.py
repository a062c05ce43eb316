"""Nearest-image search: embed a query image with the run's own model and look it up in index.faiss."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import torch

from mixem import folders, manifest
from mixem.errors import ConfigError, DataError
from mixem.rundir import CLUSTERS, GENERATION_KEY, INDEX, read_clusters


def search(
    out: str | Path, image: str | Path, k: int = 10, *, model: str | None = None, device: str = "auto"
) -> list[dict]:
    """The k images of run `out` closest to `image` (cosine similarity), best first.

    The query is embedded the way the run embedded its images (manifest.json: model, engine, features);
    `model` overrides the model path when the run's files moved. Rows: rank, image_path, score, cluster.
    """
    out = Path(out)
    if k < 1:
        raise ConfigError(f"-k must be >= 1, got {k}")
    m = manifest.load(out)
    if m is None:
        raise DataError(f"{out}: no {manifest.MANIFEST}; run `mixem-fast embed MODEL IMAGES --out {out}` first")
    rec = read_clusters(out, m)  # the index and clusters.parquet of one complete cluster run of this listing
    from mixem.embed import load_embed_engine
    from mixem.engines import model_identity

    engine = load_embed_engine(model or m.model, m.engine, m.features, device)
    if model_identity(engine)[1] != m.model_sha256:
        raise DataError(
            f"{model or m.model}: not the model {out} was embedded with (its fingerprint differs); "
            "pass --model with that model"
        )
    try:
        x = np.array(folders.decode(str(image), engine.image_size, "L" if engine.in_channels == 1 else "RGB")[None])
    except Exception as e:  # noqa: BLE001 (PIL raises many types for one meaning: not a readable image)
        raise DataError(f"{image}: cannot read this image ({type(e).__name__}: {e})") from None
    outs = engine(x)
    q = outs[2] if m.features == "backbone" else outs[0]
    q = torch.nn.functional.normalize(q.float(), dim=1).cpu().numpy()
    index = _read_index(out / INDEX)
    scores, ids = index.search(np.ascontiguousarray(q, dtype=np.float32), min(k, index.ntotal))
    hit = [(rank, i, s) for rank, (i, s) in enumerate(zip(ids[0].tolist(), scores[0].tolist()), 1) if i >= 0]
    # Only the hits' rows: clusters.parquet is written in row groups, so the id filter skips most of the file.
    table = _hit_rows(out / CLUSTERS, [i for _, i, _ in hit], rec["generation"]) if hit else None
    row = (
        {}
        if table is None
        else {
            int(i): (p, int(c))
            for i, p, c in zip(
                table.column("id").to_numpy(),
                table.column("image_path").to_pylist(),
                table.column("cluster").to_numpy(),
            )
        }
    )
    hits = []
    for rank, i, s in hit:
        if i not in row:
            raise DataError(f"{out / CLUSTERS}: no row for id {i} of {out / INDEX}; run `mixem-fast cluster` again")
        path, cluster = row[i]
        hits.append({"rank": rank, "image_path": path, "score": round(float(s), 6), "cluster": cluster})
    return hits


def _read_index(path: Path):
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise DataError(f"{path}: not a readable faiss index ({str(e).splitlines()[0][:200]}); cluster again") from None
    return index


def _hit_rows(path: Path, ids: list[int], generation: str):
    """The rows of clusters.parquet for these ids (row groups skipped by the id filter), from the checked set."""
    import pyarrow as pa

    try:
        meta = pq.read_schema(path).metadata or {}
        table = pq.read_table(path, columns=["id", "image_path", "cluster"], filters=[("id", "in", ids)])
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: damaged ({str(e).splitlines()[0][:200]}); run `mixem-fast cluster` again") from None
    if meta.get(GENERATION_KEY, b"").decode() != generation:
        raise DataError(f"{path}: not from the same cluster run as the index; run `mixem-fast cluster` again")
    return table
