"""Embedding shards on disk (clip-retrieval layout): atomic npy + parquet per shard, stats written last; readers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mixem.errors import DataError
from mixem.files import atomic_write_text

EMB_DIR, META_DIR, STATS_DIR = "embeddings", "metadata", "stats"
OK = "ok"  # other statuses: "corrupt" (decoder refused it), "too_large" (decompression-bomb limit), "unreadable"


def emb_path(out: Path, shard: int) -> Path:
    return Path(out) / EMB_DIR / f"img_emb_{shard:05d}.npy"


def meta_path(out: Path, shard: int) -> Path:
    return Path(out) / META_DIR / f"metadata_{shard:05d}.parquet"


def stats_path(out: Path, shard: int) -> Path:
    return Path(out) / STATS_DIR / f"{shard:05d}.json"


def _replace(tmp: Path, final: Path):
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())  # the data reaches the disk before the name does: no half file after a crash
    os.replace(tmp, final)


def write_shard(
    out: Path,
    shard: int,
    ids: np.ndarray,
    paths: list[str],
    vectors: np.ndarray,
    probs: np.ndarray,
    status: list[str],
    errors: list[str | None],
    stats: dict,
):
    """One shard: embeddings npy, then metadata parquet, each via a temporary name; stats json last = done.

    vectors (n, D) float16 (zero rows where status != ok); probs (n, K) float32 (ignored where not ok).
    """
    out = Path(out)
    n = len(ids)
    if not (len(paths) == len(vectors) == len(probs) == len(status) == len(errors) == n):
        raise DataError(f"shard {shard}: columns of different lengths ({n} ids, {len(vectors)} vectors)")
    for d in (EMB_DIR, META_DIR, STATS_DIR):
        (out / d).mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    e_final, m_final = emb_path(out, shard), meta_path(out, shard)
    e_tmp = e_final.with_name(f".{e_final.name}.tmp{pid}")
    with open(e_tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(vectors, dtype=np.float16))
    _replace(e_tmp, e_final)
    ok = np.array([s == OK for s in status])
    argmax = np.where(ok, probs.argmax(1) if probs.size else -1, -1).astype(np.int32)
    K = probs.shape[1]
    # Flat values + offsets: builds the list column without n small Python lists; unreadable rows are null.
    flat = pa.array(np.ascontiguousarray(probs, dtype=np.float32).ravel(), pa.float32())
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * K, pa.int32())
    plist = pa.ListArray.from_arrays(offsets, flat, mask=pa.array(~ok))
    table = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "image_path": pa.array(paths, pa.string()),
            "status": pa.array(status, pa.string()),
            "error": pa.array(errors, pa.string()),
            "mixture_argmax": pa.array(argmax, pa.int32()),
            "mixture_probs": plist,
        }
    )
    m_tmp = m_final.with_name(f".{m_final.name}.tmp{pid}")
    pq.write_table(table, m_tmp)
    _replace(m_tmp, m_final)
    stats = {"shard": shard, "rows": n, "ok": int(ok.sum()), "bad": int(n - ok.sum()), **stats}
    atomic_write_text(stats_path(out, shard), json.dumps(stats, indent=1) + "\n")


def read_stats(out: Path, shard: int) -> dict | None:
    """A finished shard's stats, or None when the shard is not done (no stats file, or its files are gone)."""
    p = stats_path(out, shard)
    if not p.is_file():
        return None
    if not (emb_path(out, shard).is_file() and meta_path(out, shard).is_file()):
        return None  # someone deleted a data file after the shard finished: redo it
    return json.loads(p.read_text())


def done_shards(out: Path, n_shards: int) -> set[int]:
    """Shards whose stats file exists (written last, so the shard's npy and parquet are complete)."""
    folder = Path(out) / STATS_DIR
    have = {int(p.stem) for p in folder.glob("[0-9]*.json")} if folder.is_dir() else set()
    return {s for s in have if s < n_shards and read_stats(out, s) is not None}


def read_shard(out: Path, shard: int, columns: list[str] | None = None) -> tuple[np.ndarray, pa.Table]:
    """(vectors (n, D) float16, metadata table) of one finished shard, row-aligned."""
    if read_stats(out, shard) is None:
        raise DataError(f"{out}: shard {shard:05d} is not finished; rerun `mixem-fast embed` with the same command")
    vectors = np.load(emb_path(out, shard), mmap_mode="r")
    meta = pq.read_table(meta_path(out, shard), columns=columns)
    if len(vectors) != meta.num_rows:
        raise DataError(f"{emb_path(out, shard)}: {len(vectors)} rows but its metadata has {meta.num_rows}")
    return vectors, meta


def probs_array(column: pa.ChunkedArray | pa.ListArray, width: int) -> np.ndarray:
    """(n, K) float32 from a mixture_probs list column; null rows (unreadable files) become zeros."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    out = np.zeros((len(arr), width), np.float32)
    valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False))
    if valid.any():
        values = arr.filter(pa.array(valid)).flatten().to_numpy()
        out[valid] = values.reshape(-1, width)
    return out


def read_ok(out: Path, n_shards: int, columns=("id", "image_path", "mixture_probs")):
    """Every readable row of every shard: (vectors (N, D) float32, {column: values}) in id order."""
    vecs, cols = [], {c: [] for c in columns}
    width = 0
    for s in range(n_shards):
        v, meta = read_shard(out, s, list({*columns, "status"}))
        ok = np.asarray(meta.column("status").to_numpy(zero_copy_only=False) == OK)
        if not ok.any():
            continue
        vecs.append(np.asarray(v[ok], dtype=np.float32))
        meta = meta.filter(pa.array(ok))
        for c in columns:
            if c == "mixture_probs":
                width = width or len(meta.column(c)[0].as_py())
                cols[c].append(probs_array(meta.column(c), width))
            else:
                cols[c].append(meta.column(c).to_numpy(zero_copy_only=False))
    if not vecs:
        raise DataError(f"{out}: no readable images were embedded; see {out}/bad_files.txt")
    return np.concatenate(vecs), {c: np.concatenate(v) for c, v in cols.items()}
