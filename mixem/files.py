"""Atomic file writes and JSON reads: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
from pathlib import Path

from mixem.errors import ConfigError, WriteError, describe_os_error


def temp_name(path: str | os.PathLike) -> Path:
    """The hidden name a file is written under before it is renamed into place (owner.clean_temps knows it)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_durably(tmp: Path, write) -> None:
    """write(tmp) then fsync it; a failure removes tmp and becomes one line naming the file (disk full, ...)."""
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _is_write_fault(e, tmp):
            raise write_error(e, tmp) from None
        raise


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Write a file so that a reader sees either the old or the new content, never half of it.

    write(tmp_path) writes the content; it is flushed to disk before the rename (so a crash cannot
    leave a complete-looking empty file), and the temporary file is removed if writing fails.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(e, path.parent) from None
    tmp = temp_name(path)
    write_durably(tmp, write)
    os.replace(tmp, path)
    return path


def _is_write_fault(e: BaseException, tmp: Path) -> bool:
    if isinstance(e, OSError):
        return True
    # Writers in C (faiss) report a full disk as a RuntimeError; the file system says what happened.
    try:
        return isinstance(e, RuntimeError) and os.statvfs(tmp.parent).f_bavail == 0
    except OSError:
        return False


def write_error(e: BaseException, path: Path) -> WriteError:
    """The one-line error for a failed write of `path` (the final name, not the temporary one)."""
    final = path.with_name(path.name[1:].rsplit(".tmp", 1)[0]) if path.name.startswith(".") else path
    if not isinstance(e, OSError):
        e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return WriteError(f"cannot write {describe_os_error(e, final)}")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="surrogateescape"))


def write_npy(path: str | os.PathLike, array) -> None:
    """np.save to exactly `path` (a file object: given a name, np.save would append ".npy" to a temporary one)."""
    import numpy as np

    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def save_npy(path: str | os.PathLike, array) -> Path:
    """An array as a .npy file, written atomically."""
    return atomic_write(path, lambda tmp: write_npy(tmp, array))


def save_json(obj, path: str | os.PathLike) -> Path:
    """A dict or a dataclass (a config) as indented, key-sorted JSON, written atomically."""
    data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike, what: str = "config file"):
    """A JSON file's content, or a ConfigError naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); it was damaged or edited by hand") from None


def sha256_file(path: str | os.PathLike, h=None) -> str:
    """Hex sha256 of a file's bytes, read 1 MiB at a time; `h` (a hashlib object) is fed instead, to digest
    several files as one."""
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
