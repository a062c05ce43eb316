"""The embedding run's manifest: one sorted listing of an image folder, saved once, cut into fixed-size shards."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mixem.errors import ConfigError, DataError
from mixem.files import atomic_write, atomic_write_text
from mixem.folders import IMAGE_EXTENSIONS, list_images

MANIFEST = "manifest.json"  # run settings and counts; written after FILES, so its presence means "ready"
FILES = "files.parquet"  # one row per input file, id = row index, one row group per shard


@dataclass
class Manifest:
    """What an embedding run covers and how: the settings a resumed or parallel run must share."""

    root: str  # absolute image folder; metadata paths are root + "/" + relative path
    n_files: int  # rows in files.parquet: every listed file, readable or not
    shard_size: int  # rows per shard; shard s covers ids [s * shard_size, (s + 1) * shard_size)
    model: str  # the model path given to `embed` (checkpoint, .onnx or .plan)
    engine: str  # torch | onnx | trt
    features: str  # embedding | backbone: what the vectors are
    image_size: int  # side the engine takes, in pixels
    in_channels: int  # 1 or 3
    normalized: bool = True  # every stored vector has unit L2 norm (zero rows for unreadable files)
    version: int = 1  # layout version of this directory

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_files / self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """[start, end) ids of one shard: index ranges, so ids never change when a run restarts."""
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.n_files)

    def shard_paths(self, out: Path, shard: int) -> list[str]:
        """The relative paths of one shard's files, read from its own row group (not the whole list)."""
        table = pq.ParquetFile(Path(out) / FILES).read_row_group(shard, columns=["path"])
        return table.column("path").to_pylist()

    def to_dict(self) -> dict:
        return {**asdict(self), "n_shards": self.n_shards}


def rank_shards(n_shards: int, rank: int, world: int) -> list[int]:
    """Rank r of W takes shards r, r + W, ...: every shard exactly once, nothing padded or duplicated."""
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    return list(range(rank, n_shards, world))


def _write_files(out: Path, rel: list[str], shard_size: int):
    table = pa.table({"id": pa.array(range(len(rel)), pa.int64()), "path": pa.array(rel, pa.string())})
    atomic_write(out / FILES, lambda tmp: pq.write_table(table, tmp, row_group_size=shard_size))


def create(root: Path, out: Path, settings: dict, shard_size: int) -> Manifest:
    """List root once, write files.parquet then manifest.json; an existing manifest is reused if it matches."""
    root = Path(root).resolve()
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {shard_size}")
    want = dict(root=str(root), shard_size=shard_size, **settings)
    existing = load(out)
    if existing is not None:
        return _same(existing, want, out)  # resume: the saved listing wins, so shard ids stay what they were
    if not root.is_dir():
        raise DataError(f"{root}: no such image folder")
    rel = list_images(root)
    if not rel:
        exts = ", ".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))
        raise DataError(f"{root}: no image files found (looked recursively for {exts}, any case)")
    out.mkdir(parents=True, exist_ok=True)
    _write_files(out, rel, shard_size)
    m = Manifest(n_files=len(rel), **want)
    atomic_write_text(out / MANIFEST, json.dumps(m.to_dict(), indent=2) + "\n")
    return m


def _same(m: Manifest, want: dict, out: Path) -> Manifest:
    have = m.to_dict()
    diff = [f"{k}: {have[k]!r} there, {v!r} now" for k, v in want.items() if have.get(k) != v]
    if diff:
        raise ConfigError(
            f"{out} holds an embedding run with other settings ({'; '.join(diff)}); "
            "rerun with the same ones to resume it, or choose a new --out"
        )
    return m


def load(out: Path) -> Manifest | None:
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        data.pop("n_shards", None)
        return Manifest(**data)
    except (json.JSONDecodeError, TypeError) as e:
        raise DataError(f"{path}: not a mixem-fast embedding manifest ({e})") from None


def wait_for(root: Path, out: Path, settings: dict, shard_size: int, timeout_s: float, poll_s: float = 0.2) -> Manifest:
    """Ranks > 0 wait for rank 0's manifest rather than listing the folder W times, then check it matches."""
    want = dict(root=str(Path(root).resolve()), shard_size=shard_size, **settings)
    deadline = time.monotonic() + timeout_s
    while True:
        m = load(out)
        if m is not None:
            return _same(m, want, out)
        if time.monotonic() > deadline:
            raise DataError(
                f"{out}/{MANIFEST}: not written by rank 0 within {timeout_s:.0f} s; "
                "check that rank 0 runs and can list the image folder"
            )
        time.sleep(poll_s)
