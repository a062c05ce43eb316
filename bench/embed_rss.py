"""Study: the resident memory of `mixem-fast embed` over a long run, shard after shard (it must stay flat).

mixem-fast bench embed_rss --set files=1000000 --set shard_size=10000
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image

from mixem.bench.embed_pipeline import fashion_images

NAME = "embed_rss"
PARAMS = {"files": 100_000, "shard_size": 5000}
QUICK = {"files": 300, "shard_size": 100}


def result_stem(params: dict) -> str:
    return f"embed_rss_{params['files']}"


def rss_kb(pid: int) -> int | None:
    """A process's resident memory (VmRSS, kB) from /proc; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def write_fashion_jpegs(root: Path, n: int) -> None:
    """n small real JPEGs (the embedded Fashion-MNIST items, cycled), 1,000 per folder."""
    fm = fashion_images(10_000)
    for i in range(n):
        d = root / f"{i // 1000:05d}"
        if i % 1000 == 0:
            d.mkdir(parents=True)
        Image.fromarray(fm[i % len(fm)]).save(d / f"{i:07d}.jpg", quality=90)


def watch(proc, sample, label: str = "mixem-fast", every_s: float = 0.1) -> bytes:
    """Call sample() every `every_s` seconds while proc runs; its stdout, or a RuntimeError with its stderr's end."""
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            sample()
            time.sleep(every_s)

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    out, err = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{label}: {err.decode()[-2000:]}")
    return out


def run_sampled(cmd: list[str], log: Path, t0: float) -> tuple[dict, list[tuple[float, int, int]]]:
    """Run a `mixem-fast` command that prints JSON; sample its VmRSS every 0.1 s with the shards it has finished
    (its --json-log shard events). Returns (its JSON, [(seconds, shards done, RSS kB)])."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    samples = []

    def sample():
        rss = rss_kb(proc.pid)
        shards = log.read_text().count('"event": "shard"') if log.exists() else 0
        if rss is not None:
            samples.append((round(time.perf_counter() - t0, 2), shards, rss))

    return json.loads(watch(proc, sample)), samples


def study(params: dict, quick: bool, device) -> dict:
    """Embed `files` small real JPEGs (Fashion-MNIST, 28 px) with `mixem-fast embed` in a child process; sample
    its VmRSS every 0.1 s together with the number of finished shards (from the JSON log)."""
    import torch

    from mixem.checkpoint import save_checkpoint
    from mixem.config import PRESETS, MixEMConfig
    from mixem.model import MixEM

    n, shard_size = params["files"], params["shard_size"]
    tmp = Path(tempfile.mkdtemp(prefix="mixem_rss_"))
    try:
        t0 = time.perf_counter()
        write_fashion_jpegs(tmp / "imgs", n)
        t_write = time.perf_counter() - t0
        cfg = MixEMConfig(**PRESETS["cpu"]["model"])
        torch.manual_seed(0)
        save_checkpoint(tmp / "ckpt", MixEM(cfg), cfg)
        log = tmp / "log.jsonl"
        cmd = [
            sys.executable,
            "-m",
            "mixem.cli",
            "embed",
            str(tmp / "ckpt"),
            str(tmp / "imgs"),
            "--out",
            str(tmp / "out"),
            "--shard-size",
            str(shard_size),
            "-q",
            "--json-log",
            str(log),
        ]
        summary, samples = run_sampled(cmd, log, t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    per_shard = {}
    for _, s, rss in samples:
        per_shard[s] = max(per_shard.get(s, 0), rss)
    n_sh = max(per_shard) if per_shard else 0
    first = max(v for s, v in per_shard.items() if s <= 1) if per_shard else None
    res = {
        "files": n,
        "shard_size": shard_size,
        "seconds_writing_files": round(t_write, 1),
        "embed_seconds": summary["seconds"],
        "images_per_s": summary["images_per_s"],
        "peak_rss_mb": round(max(r for _, _, r in samples) / 1024, 1),
        "rss_mb_by_shards_done": {int(s): round(v / 1024, 1) for s, v in sorted(per_shard.items())},
        "rss_mb_after_first_shard": round(first / 1024, 1) if first else None,
        "rss_mb_last_shard": round(per_shard[n_sh] / 1024, 1) if per_shard else None,
        "how": "VmRSS of the `mixem-fast embed` child from /proc every 0.1 s; max per number of shards "
        "finished (counted from the --json-log shard events)",
        "load_average": os.getloadavg(),
    }
    res["lines"] = [
        f"{n:,} files: {res['images_per_s']:,.0f} img/s, peak RSS {res['peak_rss_mb']:,.0f} MB, "
        f"after the first shard {res['rss_mb_after_first_shard']} MB, at the last {res['rss_mb_last_shard']} MB"
    ]
    return res
