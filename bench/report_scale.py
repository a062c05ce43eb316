"""Study: `cluster` and its report.html at scale (1M embeddings): seconds per part and the page's size.

mixem-fast bench report_scale --set rows=1000000 --set model=runs/mixem

The embedding folder is synthetic but shaped like a real one: the model's embeddings of the 10,000 embedded
Fashion-MNIST images and their fingerprints (mixem.fingerprints) are fitted per label with a Gaussian (mean and
full covariance), and `rows` vectors are drawn from those (unit length, float16), with mixture probabilities
drawn from the real rows of the same label. Every row is a file: a hard link to a real image of its label,
in a folder named after its label, listed by the real manifest code; the shards are written by the real shard writer. So
`cluster` reads, clusters, searches and reports exactly as on an embedded folder, with thumbnails of real
images; only the vectors are drawn, not computed (embedding 1M files takes ~4 min here: README).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

NAME = "report_scale"
PARAMS = {"rows": 1_000_000, "k": 10, "model": "", "shard_size": 10_000, "keep": ""}
QUICK = {"rows": 3_000, "shard_size": 1_000}


def result_stem(params: dict) -> str:
    return f"report_scale_{params['rows']}"


def _real_rows(model: str, work: Path):
    """(embeddings (10k, D), fingerprints (10k, 63), probs (10k, K), labels, images) of the embedded split."""
    import torch

    from mixem import fingerprints
    from mixem.checkpoint import save_checkpoint
    from mixem.config import PRESETS, MixEMConfig
    from mixem.data import load_images
    from mixem.engines import load_engine
    from mixem.model import MixEM

    if not model:  # no trained run given: an untrained cpu-preset model (its embedding is less clustered)
        cfg = MixEMConfig(**PRESETS["cpu"]["model"])
        torch.manual_seed(0)
        model = str(save_checkpoint(work / "ckpt", MixEM(cfg), cfg))
    engine = load_engine(model, "torch", "cpu")
    ds = load_images(None, image_size=engine.image_size, in_channels=engine.in_channels)
    x = ds.images.numpy()
    outs = [engine(x[s : s + 500]) for s in range(0, len(x), 500)]
    emb = np.concatenate([o[0].numpy() for o in outs])
    probs = np.concatenate([o[1].numpy() for o in outs])
    return model, engine, emb, fingerprints.describe(x).astype(np.float32), probs, ds.labels, x


def _draw(real: np.ndarray, labels: np.ndarray, per_row: np.ndarray, rng) -> np.ndarray:
    """Rows drawn from a Gaussian fitted to each label's real rows, scaled to unit length, float16."""
    out = np.empty((len(per_row), real.shape[1]), np.float16)
    for c in np.unique(labels):
        rows = np.flatnonzero(per_row == c)
        mine = real[labels == c].astype(np.float64)
        v = rng.multivariate_normal(mine.mean(0), np.cov(mine.T), size=len(rows))
        out[rows] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def build(out: Path, rows: int, shard_size: int, model: str, work: Path, seed: int = 0) -> float:
    """The image folder (hard links) and the embedding folder in `out`; returns the seconds it took."""
    from PIL import Image

    from mixem import manifest, shards
    from mixem.engines import model_identity

    t0 = time.perf_counter()
    model, engine, emb, fps, probs, labels, images = _real_rows(model, work)
    rng = np.random.default_rng(seed)
    per_row = rng.integers(0, labels.max() + 1, rows)
    src = work / "src"
    src.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im[0] if im.shape[0] == 1 else im.transpose(1, 2, 0)).save(src / f"{i:05d}.png")
    by_label = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    pick = np.array([by_label[c][rng.integers(len(by_label[c]))] for c in per_row])
    root = out.parent / f"{out.name}_images"
    made = set()
    for i in range(rows):  # label/chunk/file: the labels come from the first sub-folder, as for a real folder
        folder = root / f"class{per_row[i]}" / f"{i // 1000:04d}"
        if folder not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        os.link(src / f"{pick[i]:05d}.png", folder / f"{i:07d}.png")
    path, sha = model_identity(engine)
    settings = dict(model=path, model_sha256=sha, engine="torch", features="embedding",
                    image_size=engine.image_size, in_channels=engine.in_channels, follow_links=False)  # fmt: skip
    m, _ = manifest.open_run(root, out, settings, shard_size)
    vec, fp = _draw(emb, labels, per_row, rng), _draw(fps, labels, per_row, rng)
    digests = m.shard_digests(out)
    for s in range(m.n_shards):
        a, b = m.shard_range(s)
        rel = m.shard_paths(out, s)
        i = np.array([int(Path(p).stem) for p in rel])  # the listing is sorted by path: row i is file i
        stamp = {"run_id": m.run_id, "digest": digests[s], "model_sha256": m.model_sha256, "start": a, "end": b}
        stamp |= {"dim": vec.shape[1], "components": probs.shape[1], "seconds": 0.0}
        shards.write_shard(out, s, np.arange(a, b), [f"{m.root}/{p}" for p in rel], vec[i], probs[pick[i]],
                           [shards.OK] * (b - a), [None] * (b - a), stamp, fingerprints=fp[i])  # fmt: skip
    return time.perf_counter() - t0


def study(params: dict, quick: bool, device) -> dict:
    """Build the folder, then time `cluster` (k-means, near-duplicates, report) on it, in this process."""
    from mixem.clustering import cluster_run

    work = Path(tempfile.mkdtemp(prefix="mixem_report_scale_"))
    out = Path(params["keep"]) if params["keep"] else work / "emb"
    try:
        built = build(out, params["rows"], params["shard_size"], params["model"], work)
        t0 = time.perf_counter()
        summary = cluster_run(out, params["k"])
        wall = time.perf_counter() - t0
        import json

        metrics = json.loads((out / "metrics.json").read_text())
        page = (out / "report.html").stat().st_size
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {
        "rows": params["rows"],
        "seconds_building_the_folder": round(built, 1),
        "seconds_cluster_command": round(wall, 1),
        "seconds_kmeans_with_reading": metrics["seconds_kmeans"],
        "seconds_duplicates": metrics["seconds_duplicates"],
        "seconds_report": metrics["seconds_report"],
        "report_mb": round(page / 2**20, 2),
        "duplicate_pairs": summary.get("duplicates", {}).get("pairs"),
        "acc_vs_drawn_labels": summary.get("acc"),
        "load_average": os.getloadavg(),
        "model": params["model"] or "untrained cpu preset",
    }
    res["lines"] = [
        f"{res['rows']:,} rows: cluster {res['seconds_cluster_command']} s (k-means with reading "
        f"{res['seconds_kmeans_with_reading']} s, near-duplicates {res['seconds_duplicates']} s, report.html "
        f"{res['seconds_report']} s, {res['report_mb']} MB)"
    ]
    return res
