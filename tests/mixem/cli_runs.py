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
