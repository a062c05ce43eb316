"""An output set written as one: every file staged under a temporary name, committed under a record readers check.

`cluster` writes clusters.parquet, centroids.npy, index.faiss, metrics.json and report.html beside the
shards, and `export` writes model.onnx with its reports: files that only mean something together. An
OutputSet stages each file (`.NAME.tmpPID`, flushed to disk), then commits:
  1. the record `SET.set.json` says "committing" (readers now refuse the set: it is being replaced);
  2. every staged file is renamed into place, and the files of the previous set that this one lacks go;
  3. the record says "complete", with the generation, what the set is tied to, and each file's size.
A kill before 1 leaves the previous set whole; a kill in 1-3 leaves a record that is not "complete", which
every reader refuses until the command is run again. So a reader never takes files of two runs for one set.
New outputs join by being written through the same OutputSet; a reader checks them with read_set().
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from mixem.errors import DataError
from mixem.files import atomic_write_text, temp_name, write_durably

SUFFIX = ".set.json"


def record_path(out: str | os.PathLike, name: str) -> Path:
    return Path(out) / f"{name}{SUFFIX}"


def _fsync_dir(folder: Path):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputSet:
    """Stage files with write(), then commit() them as one set (a with-block commits on success, discards on error).

    tie: what the set was computed from (e.g. the embedding run's id); read_set refuses a set whose tie
    differs from the reader's. `generation` is new for every set: writers may also store it inside files.
    """

    def __init__(self, out: str | os.PathLike, name: str, tie: dict | None = None):
        self.out, self.name, self.tie = Path(out), name, tie or {}
        self.generation = uuid.uuid4().hex
        self.staged: dict[str, Path] = {}

    def write(self, filename: str, write) -> Path:
        """Stage one file: write(tmp_path) writes it; returns the staged path (readable until commit)."""
        if "/" in filename or filename.startswith("."):
            raise ValueError(f"an output set holds plain top-level file names, not {filename!r}")
        tmp = temp_name(self.out / filename)
        write_durably(tmp, write)
        self.staged[filename] = tmp
        return tmp

    def commit(self, **extra) -> dict:
        """Rename every staged file into place under the record (see the module docstring); returns the record."""
        rec_path = record_path(self.out, self.name)
        old = _files_of(rec_path)
        record = {
            "set": self.name,
            "generation": self.generation,
            "tie": self.tie,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": {f: {"bytes": p.stat().st_size} for f, p in sorted(self.staged.items())},
            **extra,
        }
        atomic_write_text(rec_path, json.dumps({**record, "state": "committing"}, indent=1) + "\n")
        _fsync_dir(self.out)
        for filename, tmp in self.staged.items():
            os.replace(tmp, self.out / filename)
        for filename in old - set(self.staged):
            (self.out / filename).unlink(missing_ok=True)
        self.staged = {}
        atomic_write_text(rec_path, json.dumps({**record, "state": "complete"}, indent=1) + "\n")
        _fsync_dir(self.out)
        return record

    def discard(self):
        for tmp in self.staged.values():
            tmp.unlink(missing_ok=True)
        self.staged = {}

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.commit()
        else:
            self.discard()
        return False


def _files_of(rec_path: Path) -> set[str]:
    """The files an earlier record lists (complete or not): the previous set, to remove what the new one lacks."""
    try:
        files = json.loads(rec_path.read_text(encoding="utf-8")).get("files", {})
    except (OSError, ValueError, AttributeError):
        return set()
    return {f for f in files if isinstance(f, str) and "/" not in f and not f.startswith(".")}


def read_set(out: str | os.PathLike, name: str, tie: dict | None = None, *, rerun: str) -> dict:
    """The record of a complete set whose files are all there, unchanged in size, and whose tie matches `tie`.

    rerun: the command that rebuilds the set, for the one-line error when anything is off.
    """
    out = Path(out)
    path = record_path(out, name)
    if not path.is_file():
        raise DataError(f"{out}: no {name} outputs ({path.name} is missing); run `{rerun}` first")
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        files = dict(rec["files"])
        state = rec["state"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise DataError(f"{path}: damaged or edited by hand; run `{rerun}` again") from None
    if state != "complete":
        raise DataError(f"{out}: the {name} outputs are half replaced (a run was interrupted); run `{rerun}` again")
    if tie is not None and rec.get("tie") != tie:
        raise DataError(f"{out}: the {name} outputs were made from other data than is there now; run `{rerun}` again")
    for f, meta in files.items():
        p = out / f
        size = p.stat().st_size if p.is_file() else None
        if size is None or not isinstance(meta, dict) or size != meta.get("bytes"):
            what = "is missing" if size is None else "was changed since it was written"
            raise DataError(f"{p}: {what} (it belongs to the {name} outputs); run `{rerun}` again")
    return rec
