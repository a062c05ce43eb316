"""The embedding run's manifest: one sorted listing of an image folder, saved once, cut into fixed-size shards.

manifest.json holds the run's settings (image folder and model resolved to absolute paths, the model's
fingerprint, engine, features, shard size) and describes files.parquet (row count and sha256): one row per
listed file (id, path relative to the root, size, mtime, gone), one row group per shard. A rerun lists the
folder again and refuses to go on when files were added, removed or changed, unless --update: then new
files get new ids after the old ones, removed ones stay as rows marked gone, and only the shards whose
rows changed are embedded again (a shard's stats carry a digest of its rows: shards.check).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mixem.config import ENGINES, check_types
from mixem.errors import ConfigError, DataError
from mixem.files import atomic_write, atomic_write_text, sha256_file
from mixem.folders import IMAGE_EXTENSIONS, iter_images

MANIFEST = "manifest.json"  # run settings and counts; written after FILES, so its presence means "ready"
FILES = "files.parquet"  # one row per input file, id = row index, one row group per shard
VERSION = 2  # layout version: 2 = resolved paths, model fingerprint, listing with sizes, shards tied to the run
_COLUMNS = {"id": pa.int64(), "path": pa.string(), "bytes": pa.int64(), "mtime_ns": pa.int64(), "gone": pa.bool_()}
# The settings a shard's content depends on: a shard made under the same ones is the same shard.
RUN_KEYS = ("root", "shard_size", "model_sha256", "engine", "features", "image_size", "in_channels", "follow_links")


@dataclass
class Manifest:
    """What an embedding run covers and how: the settings a resumed or parallel run must share."""

    root: str  # absolute, resolved image folder; metadata paths are root + "/" + relative path
    n_files: int  # rows in files.parquet: every listed file, readable or not (and gone ones, after --update)
    shard_size: int  # rows per shard; shard s covers ids [s * shard_size, (s + 1) * shard_size)
    model: str  # absolute path of the model the engine loaded (checkpoint dir, .onnx or .plan file)
    model_sha256: str  # fingerprint of the model's files: a search or resume with other weights is refused
    engine: str  # torch | onnx | trt
    features: str  # embedding | backbone: what the vectors are
    image_size: int  # side the engine takes, in pixels
    in_channels: int  # 1 or 3
    files_sha256: str  # of files.parquet: the listing this manifest describes
    follow_links: bool = False  # links that leave the root were followed when listing
    normalized: bool = True  # every stored vector has unit L2 norm (zero rows for unreadable files)
    version: int = VERSION  # layout version of this directory

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_files / self.shard_size)

    @property
    def run_id(self) -> str:
        """Digest of the settings shards depend on; every shard's stats carry it (shards.check)."""
        return hashlib.sha256(json.dumps([getattr(self, k) for k in RUN_KEYS]).encode()).hexdigest()[:16]

    def shard_range(self, shard: int) -> tuple[int, int]:
        """[start, end) ids of one shard: index ranges, so ids never change when a run restarts."""
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.n_files)

    def shard_rows(self, out: Path, shard: int) -> pa.Table:
        """One shard's rows of files.parquet (its own row group, not the whole list), paths checked."""
        start, end = self.shard_range(shard)
        f = pq.ParquetFile(Path(out) / FILES)
        if f.metadata.num_row_groups == self.n_shards:
            table = f.read_row_group(shard)
        else:  # written with another row-group size: slice the whole list
            table = f.read().slice(start, end - start)
        if table.num_rows != end - start or table.column("id").to_pylist() != list(range(start, end)):
            raise DataError(f"{Path(out) / FILES}: rows of shard {shard} are not ids {start}..{end - 1}; {_EDITED}")
        for p in table.column("path").to_pylist():
            check_relative(p, Path(out) / FILES)
        return table

    def shard_paths(self, out: Path, shard: int) -> list[str]:
        """The relative paths of one shard's files."""
        return self.shard_rows(out, shard).column("path").to_pylist()

    def shard_digest(self, out: Path, shard: int, rows: pa.Table | None = None) -> str:
        """Digest of one shard's rows (ids, paths, sizes, mtimes, gone): --update changes it where rows changed."""
        rows = rows if rows is not None else self.shard_rows(out, shard)
        h = hashlib.sha256()
        for name in _COLUMNS:
            h.update(json.dumps(rows.column(name).to_pylist()).encode("utf-8", "surrogateescape"))
        return h.hexdigest()[:16]

    def shard_digests(self, out: Path) -> list[str]:
        """shard_digest of every shard, one row group of files.parquet at a time: memory stays flat in the number
        of files (the whole listing of 1M files held at once cost ~0.2 KB a file at the end of an embed)."""
        path = Path(out) / FILES
        try:
            f = pq.ParquetFile(path)
            _check_columns(f.schema_arrow, path)
            if f.metadata.num_row_groups == self.n_shards:
                return [self.shard_digest(out, s, f.read_row_group(s)) for s in range(self.n_shards)]
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: unreadable ({str(e).splitlines()[0][:200]}); {_EDITED}") from None
        table = read_files(out)  # written with another row-group size: slice the whole list
        return [
            self.shard_digest(out, s, table.slice(a, b - a))
            for s, (a, b) in enumerate(map(self.shard_range, range(self.n_shards)))
        ]

    def to_dict(self) -> dict:
        return {**asdict(self), "n_shards": self.n_shards}


_EDITED = "it was damaged or edited by hand: embed again into a new --out"


def check_relative(p, where: Path) -> str:
    """A listed path must stay inside the image folder: relative, no '..', no empty parts."""
    parts = p.split("/") if isinstance(p, str) else []
    if not parts or p.startswith("/") or any(s in ("", ".", "..") for s in parts) or "\x00" in p:
        raise DataError(f"{where}: path {p!r} is not inside the image folder; {_EDITED}")
    return p


def rank_shards(n_shards: int, rank: int, world: int) -> list[int]:
    """Rank r of W takes shards r, r + W, ...: every shard exactly once, nothing padded or duplicated."""
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    return list(range(rank, n_shards, world))


def scan_rows(root: Path, follow_links: bool, left_out: list[str]) -> Iterator[tuple[str, int, int]]:
    """(relative path, bytes, mtime_ns) of the images under root in sorted order, as the folder is walked
    (-1, -1 for a dangling link); what is left out is appended to left_out: links that lead outside root (when
    not following them), and files whose names are not UTF-8."""
    for p in iter_images(root, follow_links=follow_links, left_out=left_out):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:  # a name that is not UTF-8: parquet cannot hold it; left out, and said
            left_out.append(p.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
            continue
        try:
            st = os.stat(root / p)
            yield p, st.st_size, st.st_mtime_ns
        except OSError:
            yield p, -1, -1  # listed, unreadable: the run records it as such


def scan(root: Path, follow_links: bool) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """{relative path: (bytes, mtime_ns)} of the images under root, and what was left out (scan_rows)."""
    left_out: list[str] = []
    return {p: (b, t) for p, b, t in scan_rows(root, follow_links, left_out)}, left_out


def _write(out: Path, table: pa.Table, shard_size: int, want: dict) -> Manifest:
    """files.parquet, then manifest.json describing it (a kill between the two is repaired by the next run)."""
    atomic_write(out / FILES, lambda tmp: pq.write_table(table, tmp, row_group_size=shard_size))
    m = Manifest(n_files=table.num_rows, files_sha256=sha256_file(out / FILES), **want)
    atomic_write_text(out / MANIFEST, json.dumps(m.to_dict(), indent=2) + "\n")
    return m


def _write_listing(out: Path, rows: Iterator[tuple[str, int, int]], shard_size: int, want: dict, empty) -> Manifest:
    """A new run's files.parquet written as the folder is walked, one row group (a shard's rows) at a time, so
    memory does not grow with the number of files; then manifest.json. empty(): the error when nothing is found."""
    schema = pa.schema(list(_COLUMNS.items()))

    def write(tmp: Path) -> None:
        n = 0
        with pq.ParquetWriter(tmp, schema) as w:
            while chunk := list(itertools.islice(rows, shard_size)):
                paths, nbytes, mtimes = zip(*chunk)
                cols = [range(n, n + len(chunk)), paths, nbytes, mtimes, [False] * len(chunk)]
                w.write_table(pa.table(dict(zip(_COLUMNS, cols)), schema=schema), row_group_size=shard_size)
                n += len(chunk)
        if n == 0:
            raise empty()

    atomic_write(out / FILES, write)
    m = Manifest(n_files=pq.ParquetFile(out / FILES).metadata.num_rows, files_sha256=sha256_file(out / FILES), **want)
    atomic_write_text(out / MANIFEST, json.dumps(m.to_dict(), indent=2) + "\n")
    return m


def _unchanged(m: Manifest, out: Path, rows: Iterator[tuple[str, int, int]], digest: str | None) -> bool:
    """Does the listing equal files.parquet row for row (and files.parquet, whose sha256 is `digest`, its
    manifest)? Read one row group at a time against the walk, so a resume checks a run of any size in flat
    memory. False also where the table was changed by --update (gone rows, files appended out of order): the
    caller then compares the two as sets."""
    path = out / FILES
    try:
        if digest != m.files_sha256:
            return False
        f = pq.ParquetFile(path)
        _check_columns(f.schema_arrow, path)
        if f.metadata.num_rows != m.n_files:
            return False
        for g in range(f.metadata.num_row_groups):
            t = f.read_row_group(g, columns=["path", "bytes", "mtime_ns", "gone"])
            if any(t.column("gone").to_pylist()):
                return False
            old = zip(t.column("path").to_pylist(), t.column("bytes").to_pylist(), t.column("mtime_ns").to_pylist())
            if list(old) != list(itertools.islice(rows, t.num_rows)):
                return False
    except (OSError, pa.ArrowException, ValueError):
        return False  # the set comparison below reads it again and says what is wrong
    return next(rows, None) is None


def open_run(root: Path, out: Path, settings: dict, shard_size: int, update: bool = False):
    """Rank 0: list root and write a new run, or check an existing one against the listing (--update: apply it).

    Returns (manifest, changes): changes counts added/removed/modified files ({} when nothing changed).
    """
    root = Path(root).resolve()
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ConfigError(f"--shard-size must be an integer >= 1, got {shard_size}")
    if not root.is_dir():
        raise DataError(f"{root}: no such image folder")
    want = dict(root=str(root), shard_size=shard_size, **settings)
    follow = want.get("follow_links", False)
    left_out: list[str] = []
    existing = load(out, strict=False)
    if existing is None:

        def empty():
            exts = ", ".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))
            outside = f"; {len(left_out)} links leading outside it were not followed (--follow-links)" * bool(left_out)
            return DataError(f"{root}: no image files found (looked recursively for {exts}, any case){outside}")

        m = _write_listing(out, scan_rows(root, follow, left_out), shard_size, want, empty)
        return m, {"added": m.n_files, "new_run": True, "links_left_out": left_out}
    _same(existing, want, out)
    try:
        digest = sha256_file(out / FILES)  # once: the row check and the manifest check below both need it
    except OSError:
        digest = None  # read_files below says what is wrong
    if _unchanged(existing, out, scan_rows(root, follow, left_out), digest):  # the usual resume: flat in memory
        return existing, {"links_left_out": left_out}
    found, left_out = scan(root, follow)  # changed (or changed by --update before): compared as sets
    table = read_files(out)
    changes = diff(table, found)
    if existing.n_files != table.num_rows or existing.files_sha256 != digest:
        existing = _write(out, table, shard_size, want)  # an --update killed between files.parquet and manifest
    if not any(changes.values()):
        return existing, {"links_left_out": left_out}
    if not update:
        raise ConfigError(
            f"{root} changed since {out} listed it ({describe(changes)}); rerun with --update to embed the "
            "changes and keep the rest, or choose a new --out"
        )
    return _write(out, apply(table, found, changes), shard_size, want), {**changes, "links_left_out": left_out}


def describe(changes: dict) -> str:
    parts = [f"{len(changes[k])} {k}" for k in ("added", "removed", "modified") if changes.get(k)]
    first = next(changes[k][0] for k in ("added", "removed", "modified") if changes.get(k))
    return ", ".join(parts) + f" files, e.g. {first}"


def diff(table: pa.Table, found: dict[str, tuple[int, int]]) -> dict[str, list[str]]:
    """Files added, removed and modified (size or mtime) between files.parquet and a new listing."""
    cols = [table.column(c).to_pylist() for c in ("path", "bytes", "mtime_ns", "gone")]
    old = {p: (b, t, g) for p, b, t, g in zip(*cols)}
    added = sorted(p for p in found if p not in old or old[p][2])
    removed = [p for p, (_, _, g) in old.items() if not g and p not in found]
    modified = [p for p, (b, t, g) in old.items() if not g and p in found and found[p] != (b, t)]
    return {"added": added, "removed": removed, "modified": modified}


def apply(table: pa.Table, found: dict[str, tuple[int, int]], changes: dict) -> pa.Table:
    """The listing after --update: old rows keep their ids (removed ones marked gone), new files appended."""
    paths = table.column("path").to_pylist()
    stats = list(zip(table.column("bytes").to_pylist(), table.column("mtime_ns").to_pylist()))
    gone = [p not in found for p in paths]
    stats = [found.get(p, s) for p, s in zip(paths, stats)]
    listed = set(paths)
    new = [p for p in changes["added"] if p not in listed]
    ids = list(range(len(paths) + len(new)))
    return _table(ids, paths + new, stats + [found[p] for p in new], gone + [False] * len(new))


def _table(ids, paths, stats, gone) -> pa.Table:
    cols = [ids, paths, [s[0] for s in stats], [s[1] for s in stats], gone]
    return pa.table({n: pa.array(c, t) for (n, t), c in zip(_COLUMNS.items(), cols)})


def read_files(out: Path) -> pa.Table:
    """files.parquet, with its columns checked."""
    path = Path(out) / FILES
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: unreadable ({str(e).splitlines()[0][:200]}); {_EDITED}") from None
    _check_columns(table.schema, path)
    return table


def _check_columns(schema: pa.Schema, path: Path) -> None:
    if any(schema.field(n).type != t if n in schema.names else True for n, t in _COLUMNS.items()):
        raise DataError(f"{path}: not a mixem-fast listing (columns {schema.names}); {_EDITED}")


def _same(m: Manifest, want: dict, out: Path) -> Manifest:
    have = m.to_dict()
    diff_ = [f"{k}: {have[k]!r} there, {v!r} now" for k, v in want.items() if k in RUN_KEYS and have.get(k) != v]
    if diff_:
        raise ConfigError(
            f"{out} holds an embedding run with other settings ({'; '.join(diff_)}); "
            "rerun with the same ones (and the same model) to resume it, or choose a new --out"
        )
    return m


def load(out: Path, strict: bool = True) -> Manifest | None:
    """The manifest of `out` (None when there is none), checked field by field; strict: files.parquet must match."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data.pop("n_shards", None)
        if data.get("version") != VERSION:
            raise DataError(
                f"{path}: layout version {data.get('version')!r}, this mixem-fast reads {VERSION}; "
                "embed again into a new --out"
            )
        if set(data) != {f.name for f in fields(Manifest)}:
            raise TypeError(f"fields {sorted(data)}")
        m = Manifest(**data)
        check_types(m)
    except (ValueError, TypeError, AttributeError, ConfigError) as e:
        raise DataError(f"{path}: not a mixem-fast embedding manifest ({e}); {_EDITED}") from None
    if m.n_files < 1 or m.shard_size < 1 or m.engine not in ENGINES or not os.path.isabs(m.root):
        raise DataError(f"{path}: impossible values (n_files {m.n_files}, shard_size {m.shard_size}); {_EDITED}")
    if strict and not (Path(out) / FILES).is_file():
        raise DataError(f"{Path(out) / FILES}: missing; {_EDITED}")
    if strict and sha256_file(Path(out) / FILES) != m.files_sha256:
        raise DataError(
            f"{Path(out) / FILES}: does not match {MANIFEST} (an --update was interrupted, or it was edited); "
            "rerun the embed command to repair it"
        )
    return m


def wait_for(root: Path, out: Path, settings: dict, shard_size: int, timeout_s: float, poll_s: float = 0.2) -> Manifest:
    """Ranks > 0 wait for rank 0's manifest (consistent with files.parquet) rather than listing the folder W times."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            m = load(out)
        except DataError:
            m = None  # rank 0 is writing it, or repairing it
        if m is not None:
            want = dict(root=str(Path(root).resolve()), shard_size=shard_size, **settings)
            return _same(m, want, out)
        if time.monotonic() > deadline:
            raise DataError(
                f"{out}/{MANIFEST}: not written by rank 0 within {timeout_s:.0f} s; "
                "check that rank 0 runs and can list the image folder"
            )
        time.sleep(poll_s)
