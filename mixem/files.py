"""Atomic file writes and JSON reads: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from mixem.errors import ConfigError


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Write a file so that a reader sees either the old or the new content, never half of it.

    write(tmp_path) writes the content; it is flushed to disk before the rename (so a crash cannot
    leave a complete-looking empty file), and the temporary file is removed if writing fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


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
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
