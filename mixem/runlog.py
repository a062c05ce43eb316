"""Console output for long work: a rich progress bar with throughput, quiet mode, and a JSON-lines log."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RunLog:
    """Prints for people (unless quiet) and appends one JSON object per event for machines."""

    def __init__(self, json_path: str | Path | None = None, quiet: bool = False, enabled: bool = True):
        self.quiet = quiet or not enabled  # `enabled` is False on non-zero distributed ranks
        self.enabled = enabled
        self.console = Console(stderr=False, highlight=False, soft_wrap=True)
        self.json_path = Path(json_path) if json_path and enabled else None
        if self.json_path:
            self.json_path.parent.mkdir(parents=True, exist_ok=True)
            _end_cut_line(self.json_path)
        self.t0 = time.perf_counter()

    def event(self, kind: str, **fields):
        if self.json_path:
            rec = {"event": kind, "time": round(time.time(), 3), "elapsed_s": round(time.perf_counter() - self.t0, 3)}
            rec.update(fields)
            with open(self.json_path, "a") as f:
                f.write(json.dumps(rec, default=_jsonable) + "\n")

    def print(self, *args, **kw):
        if not self.quiet:
            self.console.print(*args, **kw)

    def progress(self, total: int, description: str, unit: str = "img"):
        """A context manager: .advance(n, **postfix) moves the bar and shows n/s and the postfix."""
        return _Bar(self, total, description, unit)


class _Bar:
    def __init__(self, log: RunLog, total: int, description: str, unit: str):
        self.log, self.total, self.unit = log, total, unit
        self.t0 = time.perf_counter()
        self.done = 0
        self.postfix = ""
        self.progress = None
        if not log.quiet:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[postfix]}"),
                console=log.console,
                transient=not sys.stdout.isatty(),
                disable=False,
            )
            self.task = self.progress.add_task(description, total=total, rate="", postfix="")

    def __enter__(self):
        if self.progress:
            self.progress.start()
        return self

    def advance(self, n: int, **postfix):
        self.done += n
        if self.progress:
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in postfix.items())
            self.progress.update(self.task, advance=n, rate=f"{rate:,.0f} {self.unit}/s", postfix=text)

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.t0, 1e-9)

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()
        return False


def _end_cut_line(path: Path) -> None:
    """End a last line that a kill cut short, so the first event appended now starts a line of its own (readers
    skip the cut one; without the newline it would swallow the next)."""
    try:
        with open(path, "rb+") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    except FileNotFoundError:
        pass


def _jsonable(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)
