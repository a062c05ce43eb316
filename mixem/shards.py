"""Embedding shards on disk (clip-retrieval layout): npy + parquet per shard, stats written last; checked readers.

A shard counts as done only when its stats (written last) say it was made for this run (manifest run_id),
from these rows of the listing (digest), with this model, and its npy and parquet are the ones the stats
describe (sizes, rows, dtype): shards of another run, of an older listing, or damaged ones are embedded
again by `embed` and refused by every reader, never taken for this run's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mixem.errors import DataError
from mixem.files import atomic_write, atomic_write_text, write_npy

EMB_DIR, META_DIR, STATS_DIR = "embeddings", "metadata", "stats"
FP_DIR = "fingerprints"  # near-duplicate descriptors (mixem.fingerprints), row-aligned; shards of older runs lack them
OK = "ok"  # other statuses: "corrupt" (decoder refused it), "too_large" (decompression-bomb limit), "unreadable",
# "outside_root" (a link leaving the image folder, not followed), "removed" (gone from the folder, embed --update)
STATUSES = (OK, "corrupt", "too_large", "unreadable", "outside_root", "removed")
META_COLUMNS = {
    "id": pa.int64(),
    "image_path": pa.string(),
    "status": pa.string(),
    "error": pa.string(),
    "mixture_argmax": pa.int32(),
    "mixture_probs": pa.list_(pa.float32()),
}
_RERUN = "rerun the embed command to embed it again"


def emb_path(out: Path, shard: int) -> Path:
    return Path(out) / EMB_DIR / f"img_emb_{shard:05d}.npy"


def fp_path(out: Path, shard: int) -> Path:
    return Path(out) / FP_DIR / f"fp_{shard:05d}.npy"


def meta_path(out: Path, shard: int) -> Path:
    return Path(out) / META_DIR / f"metadata_{shard:05d}.parquet"


def stats_path(out: Path, shard: int) -> Path:
    return Path(out) / STATS_DIR / f"{shard:05d}.json"


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
    fingerprints: np.ndarray | None = None,
):
    """One shard: embeddings npy, fingerprints npy, then metadata parquet, each via a temporary name; stats json
    last = done.

    vectors (n, D) float16 (zero rows where status != ok); probs (n, K) float32 (ignored where not ok);
    fingerprints (n, F) float16 near-duplicate descriptors (zero rows where not ok), or None.
    stats: what ties the shard to its run (run_id, digest, model_sha256, start, end) and timings.
    """
    out = Path(out)
    n = len(ids)
    if not (len(paths) == len(vectors) == len(probs) == len(status) == len(errors) == n):
        raise DataError(f"shard {shard}: columns of different lengths ({n} ids, {len(vectors)} vectors)")
    e_final, m_final = emb_path(out, shard), meta_path(out, shard)
    vec16 = np.ascontiguousarray(vectors, dtype=np.float16)
    atomic_write(e_final, lambda tmp: write_npy(tmp, vec16))
    fp = {}
    if fingerprints is not None:
        fp16 = np.ascontiguousarray(fingerprints, dtype=np.float16)
        if len(fp16) != n:
            raise DataError(f"shard {shard}: {len(fp16)} fingerprints for {n} rows")
        atomic_write(fp_path(out, shard), lambda tmp: write_npy(tmp, fp16))
        fp = {"fp_bytes": fp_path(out, shard).stat().st_size, "fp_dim": int(fp16.shape[1])}
    ok = np.array([s == OK for s in status])
    argmax = np.where(ok, probs.argmax(1) if probs.size else -1, -1).astype(np.int32)
    K = probs.shape[1]
    # Flat values + offsets: builds the list column without n small Python lists; unreadable rows are null.
    flat = pa.array(np.ascontiguousarray(probs, dtype=np.float32).ravel(), pa.float32())
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * K, pa.int32())
    plist = pa.ListArray.from_arrays(offsets, flat, mask=pa.array(~ok))
    cols = [ids, paths, status, errors, argmax]
    table = pa.table(
        {name: pa.array(c, t) for (name, t), c in zip(META_COLUMNS.items(), cols)} | {"mixture_probs": plist}
    )
    atomic_write(m_final, lambda tmp: pq.write_table(table, tmp))
    stats = {
        "shard": shard,
        "rows": n,
        "ok": int(ok.sum()),
        "bad": int(n - ok.sum()),
        **stats,
        "npy_bytes": e_final.stat().st_size,
        "parquet_bytes": m_final.stat().st_size,
        **fp,
    }
    atomic_write_text(stats_path(out, shard), json.dumps(stats, indent=1) + "\n")


def read_stats(out: Path, shard: int) -> dict | None:
    """A shard's stats as written (None when there are none or they are not a JSON object)."""
    try:
        st = json.loads(stats_path(out, shard).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return st if isinstance(st, dict) else None


def npy_header(path: Path) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, data offset) of a .npy file from its header alone; DataError when it is not one."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"npy format version {version}")
            return shape, dtype, f.tell()
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable .npy file ({e}); {_RERUN}") from None


def check(out: Path, m, shard: int, digest: str) -> str | None:
    """Why shard `shard` does not count as done for run `m` (manifest), or None when it does. Cheap: stats,
    the npy header and the parquet footer; digest is m.shard_digest() of the shard's rows."""
    st = read_stats(out, shard)
    if st is None:
        return "not embedded yet" if not stats_path(out, shard).exists() else "its stats are unreadable"
    start, end = m.shard_range(shard)
    if st.get("run_id") != m.run_id or st.get("model_sha256") != m.model_sha256:
        return "it was made by another embedding run (other settings or model)"
    if st.get("digest") != digest:
        return "its files changed in the listing since it was made (embed --update)"
    if (st.get("start"), st.get("end"), st.get("rows")) != (start, end, end - start):
        return f"it covers other ids than {start}..{end - 1}"
    e, p = emb_path(out, shard), meta_path(out, shard)
    if not (e.is_file() and p.is_file()):
        return "its npy or parquet file is missing"
    if (e.stat().st_size, p.stat().st_size) != (st.get("npy_bytes"), st.get("parquet_bytes")):
        return "its npy or parquet file was changed after it was written"
    try:
        shape, dtype, _ = npy_header(e)
        rows = pq.ParquetFile(p).metadata.num_rows
    except (DataError, OSError, pa.ArrowException):
        return "its npy or parquet file is damaged"
    if dtype != np.float16 or len(shape) != 2 or shape[0] != end - start or rows != end - start:
        return f"its files hold {shape} {dtype} vectors and {rows} rows, not {end - start} rows of float16"
    return _check_fingerprints(out, shard, st, end - start)


def _check_fingerprints(out: Path, shard: int, st: dict, rows: int) -> str | None:
    """A shard's fingerprints, when its stats say it has them (older shards do not): present, unchanged, shaped."""
    if "fp_bytes" not in st:
        return None
    f = fp_path(out, shard)
    if not f.is_file() or f.stat().st_size != st["fp_bytes"]:
        return "its fingerprints file is missing or was changed after it was written"
    try:
        shape, dtype, _ = npy_header(f)
    except DataError:
        return "its fingerprints file is damaged"
    if dtype != np.float16 or shape != (rows, st.get("fp_dim")):
        return f"its fingerprints file holds {shape} {dtype}, not ({rows}, {st.get('fp_dim')}) float16"
    return None


def done_shards(out: Path, m) -> set[int]:
    """Shards of run `m` that count as done (check() says so)."""
    digests = m.shard_digests(out)
    return {s for s in range(m.n_shards) if check(out, m, s, digests[s]) is None}


def read_shard(out: Path, shard: int, columns: list[str] | None = None) -> tuple[np.ndarray, pa.Table]:
    """(vectors (n, D) float16, metadata table) of one shard, row-aligned, each file checked (use after check())."""
    e, p = emb_path(out, shard), meta_path(out, shard)
    shape, dtype, _ = npy_header(e)
    try:
        vectors = np.load(e, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{e}: damaged ({err}); {_RERUN}") from None
    if vectors.ndim != 2 or vectors.dtype != np.float16:
        raise DataError(f"{e}: holds {vectors.dtype} {vectors.shape}, not (rows, D) float16; {_RERUN}")
    try:
        meta = pq.read_table(p, columns=columns)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{p}: damaged ({str(err).splitlines()[0][:200]}); {_RERUN}") from None
    wrong = [c for c in meta.column_names if c in META_COLUMNS and meta.schema.field(c).type != META_COLUMNS[c]]
    if wrong or len(vectors) != meta.num_rows:
        raise DataError(
            f"{p}: {len(vectors)} vectors but {meta.num_rows} rows, or wrong column types {wrong}; {_RERUN}"
        )
    if "status" in meta.column_names:
        bad = set(meta.column("status").to_pylist()) - set(STATUSES)
        if bad:
            raise DataError(f"{p}: unknown status {sorted(map(str, bad))[0]!r}; {_RERUN}")
    return vectors, meta


def probs_array(column: pa.ChunkedArray | pa.ListArray, width: int) -> np.ndarray:
    """(n, K) float32 from a mixture_probs list column; null rows (unreadable files) become zeros."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    out = np.zeros((len(arr), width), np.float32)
    valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False))
    if valid.any():
        values = arr.filter(pa.array(valid)).flatten().to_numpy()
        if values.size != valid.sum() * width:
            raise DataError(f"mixture_probs rows of different lengths (expected {width} each)")
        out[valid] = values.reshape(-1, width)
    return out


def read_ok(out: Path, n_shards: int, columns=("id", "image_path", "mixture_probs")):
    """Every readable row of every shard: (vectors (N, D) float32, {column: values}) in id order.

    Vectors and probabilities are checked to be finite, and every shard to have the same widths."""
    vecs, cols = [], {c: [] for c in columns}
    width = dim = None
    for s in range(n_shards):
        v, meta = read_shard(out, s, list({*columns, "status"}))
        ok = np.asarray(meta.column("status").to_numpy(zero_copy_only=False) == OK)
        if dim is not None and v.shape[1] != dim:
            raise DataError(f"{emb_path(out, s)}: {v.shape[1]}-dim vectors, shard 0 has {dim}; {_RERUN}")
        dim = v.shape[1]
        if not ok.any():
            continue
        x = np.asarray(v[ok], dtype=np.float32)
        if not np.isfinite(x).all():
            raise DataError(f"{emb_path(out, s)}: holds NaN or infinite vectors; {_RERUN}")
        vecs.append(x)
        meta = meta.filter(pa.array(ok))
        for c in columns:
            if c == "mixture_probs":
                width = width or len(meta.column(c)[0].as_py())
                try:
                    probs = probs_array(meta.column(c), width)
                except DataError as e:
                    raise DataError(f"{meta_path(out, s)}: {e}; {_RERUN}") from None
                if not np.isfinite(probs).all():
                    raise DataError(f"{meta_path(out, s)}: holds NaN or infinite probabilities; {_RERUN}")
                cols[c].append(probs)
            else:
                cols[c].append(meta.column(c).to_numpy(zero_copy_only=False))
    if not vecs:
        raise DataError(f"{out}: no readable images were embedded; see {out}/bad_files.txt")
    return np.concatenate(vecs), {c: np.concatenate(v) for c, v in cols.items()}


def read_fingerprints(out: Path, n_shards: int) -> np.ndarray | None:
    """(N, F) float32 near-duplicate descriptors of read_ok's rows (same order), or None when a shard was made
    before fingerprints existed (embed into a new --out to get them)."""
    parts = []
    for s in range(n_shards):
        st = read_stats(out, s) or {}
        if "fp_bytes" not in st:
            return None
        status = pq.read_table(meta_path(out, s), columns=["status"]).column("status").to_numpy(zero_copy_only=False)
        fp = np.load(fp_path(out, s), mmap_mode="r", allow_pickle=False)
        parts.append(np.asarray(fp[status == OK], dtype=np.float32))
    out_ = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    if not np.isfinite(out_).all():
        raise DataError(f"{Path(out) / FP_DIR}: holds NaN or infinite fingerprints; {_RERUN}")
    return out_


def escape_path(p: str) -> str:
    """A path on one line of bad_files.txt: backslash, tab, newline and carriage return as \\\\, \\t, \\n, \\r."""
    return p.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def temp_names(shard: int) -> dict[str, str]:
    """The final names in each shard folder that shard `shard` writes (their temporaries are `.NAME.tmpPID`)."""
    return {
        EMB_DIR: emb_path(".", shard).name,
        FP_DIR: fp_path(".", shard).name,
        META_DIR: meta_path(".", shard).name,
        STATS_DIR: stats_path(".", shard).name,
    }
