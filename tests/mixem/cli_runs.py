"""`mixem-fast train` as a child process, and killing one with SIGKILL at a chosen checkpoint (resume tests)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def cli(*args, cwd):
    """(command, Popen keywords) of `python -m mixem.cli train ARGS`, one thread, unbuffered."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return [sys.executable, "-m", "mixem.cli", "train", *args], dict(cwd=cwd, env=env)


def kill_when(cmd, kw, run_dir: Path, ready, timeout: float = 240) -> str:
    """Start cmd, SIGKILL it as soon as ready(name in checkpoints/latest) holds; returns that name."""
    proc = subprocess.Popen(cmd, **kw)
    latest = Path(run_dir) / "checkpoints" / "latest"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and ready(latest.read_text().strip()):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return latest.read_text().strip()


def kill_after_first_shard(proc: subprocess.Popen, out: Path) -> None:
    """SIGKILL an `embed`/`classify` child as soon as it has finished a shard (stats/NNNNN.json written); fails if
    it ended on its own before that."""
    stats = Path(out) / "stats"
    while proc.poll() is None and not (stats.is_dir() and any(stats.glob("[0-9]*.json"))):
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
