"""Nearest-image search: embed a query image with the run's own model and look it up in index.faiss."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import torch

from mixem import folders
from mixem.errors import ConfigError, DataError
from mixem.rundir import CLUSTERS, INDEX, load_complete


def search(
    out: str | Path, image: str | Path, k: int = 10, *, model: str | None = None, device: str = "auto"
) -> list[dict]:
    """The k images of run `out` closest to `image` (cosine similarity), best first.

    The query is embedded the way the run embedded its images (manifest.json: model, engine, features);
    `model` overrides the model path when the run's files moved. Rows: rank, image_path, score, cluster.
    """
    out = Path(out)
    m = load_complete(out)
    if k < 1:
        raise ConfigError(f"-k must be >= 1, got {k}")
    if not (out / INDEX).is_file():
        raise DataError(f"{out}/{INDEX}: no index yet; run `mixem-fast cluster {out} --k K` first")
    from mixem.embed import load_embed_engine

    engine = load_embed_engine(model or m.model, m.engine, m.features, device)
    try:
        x = np.array(folders.decode(str(image), engine.image_size, "L" if engine.in_channels == 1 else "RGB")[None])
    except Exception as e:  # noqa: BLE001 (PIL raises many types for one meaning: not a readable image)
        raise DataError(f"{image}: cannot read this image ({type(e).__name__}: {e})") from None
    outs = engine(x)
    q = outs[2] if m.features == "backbone" else outs[0]
    q = torch.nn.functional.normalize(q.float(), dim=1).cpu().numpy()
    index = faiss.read_index(str(out / INDEX))
    scores, ids = index.search(np.ascontiguousarray(q, dtype=np.float32), min(k, index.ntotal))
    hit = [(rank, i, s) for rank, (i, s) in enumerate(zip(ids[0].tolist(), scores[0].tolist()), 1) if i >= 0]
    # Only the hits' rows: clusters.parquet is written in row groups, so the id filter skips most of the file.
    table = (
        pq.read_table(
            out / CLUSTERS, columns=["id", "image_path", "cluster"], filters=[("id", "in", [i for _, i, _ in hit])]
        )
        if hit
        else None
    )
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
        path, cluster = row[i]
        hits.append({"rank": rank, "image_path": path, "score": round(float(s), 6), "cluster": cluster})
    return hits
