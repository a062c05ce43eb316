"""Child runs: `mixem-fast train` processes a run starts in its own folder and waits for (the crop candidates of
mixem.candidates, the neighbour-stage draws of mixem.draws), at the same time or in turn, with one progress line
per finished epoch read from each child's log.jsonl. A child (`Child`) has a `name` and a `train` config whose
`out` is its folder; a child that has saved its configs continues with --resume, one that has not starts
from a spec file beside its folder. Children die with the parent (Linux), so a killed run leaves none training.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mixem.config import PRESETS, MixEMConfig, TrainConfig, to_dict
from mixem.errors import MixEMError
from mixem.files import save_json
from mixem.runlog import RunLog


@dataclass
class Child:
    name: str
    train: TrainConfig  # its own run (out = its folder)

    @property
    def dir(self) -> Path:
        return Path(self.train.out)


def _die_with_parent():  # pragma: no cover (runs in the child between fork and exec)
    """Linux: the child gets SIGTERM when the parent dies, however it dies (no orphaned training)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def command(c: Child, model_cfg: MixEMConfig, preset: str, resume_args: list[str]) -> list[str]:
    """A child's `train` command line, always `--no-eval`: the parent scores what it needs from the child's saved
    model (the candidates' ACC/NMI, the draws' objective), a child's own k-means tables would only cost time."""
    cmd = [sys.executable, "-m", "mixem.cli", "train", "--out", str(c.dir), "--quiet"]
    if (c.dir / "train_config.json").is_file():  # started before: it continues (a finished one only restores)
        cmd += ["--resume", *resume_args]  # what `train --resume` was given (--epochs, --device) reaches each
    else:
        spec = c.dir.parent / f"{c.name}.json"
        save_json({"model": to_dict(model_cfg), "train": to_dict(c.train)}, spec)
        # The spec sets every field, so the preset only names the run; a resumed parent's is "resumed", which the
        # command line does not take (a child killed before it saved its configs starts again from its spec).
        cmd += ["--preset", preset if preset in PRESETS else "cpu", "--config", str(spec)]
    return cmd + ["--no-eval"]


def progress(c: Child, seen: dict, log: RunLog):
    """One line when a child finishes a stage's epoch, read from what its log.jsonl gained since last time."""
    import json

    try:
        with open(c.dir / "log.jsonl", "rb") as f:
            f.seek(seen.get(c.name, 0))
            new = f.read()
    except OSError:
        return
    for line in new.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break  # a line being written: read again next time
        seen[c.name] = seen.get(c.name, 0) + len(line)
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == "start":
            seen[c.name + ":epochs"] = e.get("train", {}).get("epochs")
        elif e.get("event") in ("epoch", "neighbors") and "epoch" in e:
            stage = "representation" if e["event"] == "epoch" else "neighbour stage"
            total = seen.get(c.name + ":epochs") if e["event"] == "epoch" else None
            log.print(f"  {c.name}: {stage} epoch {e.get('epoch')}{f'/{total}' if total else ''}"
                      f" ({e.get('images_per_s', 0):,.0f} img/s)")  # fmt: skip


def run_all(cands: list[Child], model_cfg, preset: str, *, parallel: bool, log: RunLog,
            resume_args: list[str] = (), on_done: Callable[[Child, int], None] | None = None):  # fmt: skip
    """Train every child to the end (at the same time or in turn); a failed one is an error naming its output.
    on_done(child, still_training): called as each child ends well, while the others (still_training of them) go
    on: the parent scores a finished child on the core it freed instead of after the last one."""
    batches = [cands] if parallel else [[c] for c in cands]
    for batch in batches:
        procs = []
        try:
            for c in batch:
                c.dir.parent.mkdir(parents=True, exist_ok=True)
                text = open(c.dir.parent / f"{c.name}.txt", "a")  # noqa: SIM115 (closed below, after the child)
                kw = {"preexec_fn": _die_with_parent} if sys.platform.startswith("linux") else {}
                procs.append((c, subprocess.Popen(command(c, model_cfg, preset, list(resume_args)), stdout=text,
                                                  stderr=subprocess.STDOUT, **kw), text))  # fmt: skip
            seen: dict = {}
            done: set[str] = set()
            while len(done) < len(procs):
                time.sleep(0.5)  # a child's end is noticed within half a second (2 s lost 1 s per wait on average)
                for c, p, _ in procs:
                    progress(c, seen, log)
                    if c.name not in done and p.poll() is not None:
                        done.add(c.name)
                        if p.returncode == 0 and on_done is not None:
                            on_done(c, sum(q.poll() is None for _, q, _ in procs))
            for c, _, _ in procs:  # what the last half second added
                progress(c, seen, log)
        finally:
            for _, p, text in procs:
                if p.poll() is None:
                    p.terminate()
                p.wait()
                text.close()
        for c, p, _ in procs:
            if p.returncode != 0:
                tail = (c.dir.parent / f"{c.name}.txt").read_text(errors="replace").strip().splitlines()[-1:]
                raise MixEMError(f"{c.name} failed (exit {p.returncode}): {' '.join(tail)} "
                                    f"(its output: {c.dir.parent / f'{c.name}.txt'})")  # fmt: skip


def freed_core(compute: Callable[[Child], object], results: dict, cores: int) -> Callable[[Child, int], None]:
    """An on_done for run_all: results[child.name] = compute(child) as each child ends, on the threads the children
    still training leave free (at least one; every thread when none trains). The parent's feature extraction gives
    the same values at any thread count on this CPU (measured: 1 and 2 threads, bit for bit)."""
    import torch

    def done(c: Child, still_training: int) -> None:
        before = torch.get_num_threads()
        torch.set_num_threads(max(1, cores - still_training * max(1, c.train.threads or 1)))
        try:
            results[c.name] = compute(c)
        finally:
            torch.set_num_threads(before)

    return done
