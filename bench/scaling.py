"""Study: how the cost of `embed`, `cluster` and a `train` epoch grows with the number of images.

mixem-fast bench scaling                      (10k, 100k, 1M files; train epochs at 2.5k, 10k, 40k images)
mixem-fast bench scaling --set sizes=10000,100000 --set train_sizes=2500,10000

Each command runs as its own child process (`python -m mixem.cli ...`), timed by the wall clock, its VmRSS
sampled every 0.1 s from /proc (peak RSS). The files are the embedded Fashion-MNIST items as small JPEGs,
nested so that each size's folder holds exactly that many (imgs/s100k/s10k is the 10k set); `cluster` runs on
each `embed` output with k = 100 and its report; `train` runs the cpu preset on Fashion-MNIST (the Debian
package's 70,000 images, else the embedded 10,000, which caps the sizes) for 2 epochs without refinement or evaluation, and
the second epoch's seconds count (the first pays for warm-up). The harness writes the JSON and plot() an SVG
beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from mixem.bench.embed_pipeline import fashion_images
from mixem.bench.embed_rss import rss_kb, watch

NAME = "scaling"
PARAMS = {"sizes": "10000,100000,1000000", "train_sizes": "2500,10000,40000", "k": 100}
QUICK = {"sizes": "100,300", "train_sizes": "128,256", "k": 5}


def _sizes(text: str) -> list[int]:
    return sorted({int(v) for v in str(text).split(",") if v.strip()})


def write_nested(root: Path, sizes: list[int]) -> dict[int, Path]:
    """max(sizes) small real JPEGs, nested so that folder[n] holds exactly the first n of them."""
    fm = fashion_images(10_000)
    folders, start = {}, 0
    inner = root
    for n in sorted(sizes, reverse=True)[1:]:  # the root holds all; each smaller set one level deeper
        inner = inner / f"s{n}"
    place = []
    d = inner
    for n in sorted(sizes):
        folders[n] = d
        place.append((start, n, d if n == min(sizes) else d / "more"))
        start = n
        d = d.parent
    for lo, hi, where in place:
        for i in range(lo, hi):
            sub = where / f"{i // 1000:05d}"
            if i == lo or i % 1000 == 0:
                sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(fm[i % len(fm)]).save(sub / f"{i:07d}.jpg", quality=90)
    return folders


def run_measured(args: list[str]) -> dict:
    """`python -m mixem.cli ARGS` in a child process: wall seconds and peak RSS (MB); a failure raises."""
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mixem.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = [0]

    def sample():
        peak[0] = max(peak[0], rss_kb(proc.pid) or 0)

    watch(proc, sample, label=f"mixem-fast {' '.join(args[:2])}")
    return {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(peak[0] / 1024, 1)}


def _train_data() -> str:
    from mixem.data import FASHION_MNIST_DIR

    return "fashion-mnist:all" if FASHION_MNIST_DIR.exists() else ""


def _train_epoch(tmp: Path, n: int, data: str) -> dict:
    out, log = tmp / f"train_{n}", tmp / f"train_{n}.jsonl"
    args = ["train", *([data] if data else []), "--preset", "cpu", "--max-images", str(n), "--epochs", "2"]
    args += ["--no-refine", "--no-eval", "-q", "--device", "cpu", "--out", str(out), "--json-log", str(log)]
    rec = run_measured(args)
    epochs = [json.loads(line) for line in log.read_text().splitlines() if '"event": "epoch"' in line]
    start = next(json.loads(line) for line in log.read_text().splitlines() if '"event": "start"' in line)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "images": start["images"],
        "epoch_seconds": epochs[-1]["seconds"],
        "images_per_s": epochs[-1]["images_per_s"],
        "process_seconds": rec["seconds"],
        "peak_rss_mb": rec["peak_rss_mb"],
    }


def study(params: dict, quick: bool, device) -> dict:
    import torch

    from mixem.checkpoint import save_checkpoint
    from mixem.config import PRESETS, MixEMConfig
    from mixem.model import MixEM

    sizes, train_sizes, k = _sizes(params["sizes"]), _sizes(params["train_sizes"]), int(params["k"])
    tmp = Path(tempfile.mkdtemp(prefix="mixem_scaling_"))
    res: dict = {"embed": [], "cluster": [], "train": []}
    try:
        t0 = time.perf_counter()
        folders = write_nested(tmp / "imgs", sizes)
        res["seconds_writing_files"] = round(time.perf_counter() - t0, 1)
        cfg = MixEMConfig(**PRESETS["cpu"]["model"])
        torch.manual_seed(0)
        save_checkpoint(tmp / "ckpt", MixEM(cfg), cfg)
        for n in sizes:
            out = tmp / f"emb_{n}"
            rec = run_measured(["embed", str(tmp / "ckpt"), str(folders[n]), "--out", str(out), "-q"])
            res["embed"].append({"files": n, **rec, "files_per_s": round(n / rec["seconds"], 1)})
            rec = run_measured(["cluster", str(out), "--k", str(min(k, n)), "-q"])
            res["cluster"].append({"points": n, "k": min(k, n), **rec})
            shutil.rmtree(out, ignore_errors=True)
        data = _train_data()
        res["train_data"] = data or "the embedded Fashion-MNIST test split (10,000 images)"
        for n in train_sizes:
            res["train"].append(_train_epoch(tmp, n, data))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["growth"] = _growth(res)
    res["load_average"] = os.getloadavg()
    res["lines"] = [
        *(f"embed {r['files']:>9,}: {r['seconds']:7.1f} s, peak RSS {r['peak_rss_mb']:,.0f} MB" for r in res["embed"]),
        *(
            f"cluster {r['points']:>7,}: {r['seconds']:7.1f} s, peak RSS {r['peak_rss_mb']:,.0f} MB"
            for r in res["cluster"]
        ),
        *(
            f"train epoch {r['images']:>6,} images: {r['epoch_seconds']:6.1f} s, peak RSS {r['peak_rss_mb']:,.0f} MB"
            for r in res["train"]
        ),
        "growth (exponent b of cost ~ N^b between the smallest and largest size): "
        + ", ".join(f"{k} {v}" for k, v in res["growth"].items()),
    ]
    return res


def _slope(xs: list[float], ys: list[float]) -> float | None:
    import math

    if len(xs) < 2 or min(xs) <= 0 or min(ys) <= 0 or xs[0] == xs[-1]:
        return None
    return round(math.log(ys[-1] / ys[0]) / math.log(xs[-1] / xs[0]), 2)


def _growth(res: dict) -> dict:
    e, c, t = res["embed"], res["cluster"], res["train"]
    return {
        "embed_seconds": _slope([r["files"] for r in e], [r["seconds"] for r in e]),
        "embed_peak_rss": _slope([r["files"] for r in e], [r["peak_rss_mb"] for r in e]),
        "cluster_seconds": _slope([r["points"] for r in c], [r["seconds"] for r in c]),
        "cluster_peak_rss": _slope([r["points"] for r in c], [r["peak_rss_mb"] for r in c]),
        "train_epoch_seconds": _slope([r["images"] for r in t], [r["epoch_seconds"] for r in t]),
    }


def plot(data: dict, path: Path) -> Path:
    """Seconds and peak RSS against N, log-log, one line per command (matplotlib SVG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    series = [("embed", "files", "seconds"), ("cluster", "points", "seconds"), ("train", "images", "epoch_seconds")]
    for name, xk, yk in series:
        rows = data[name]
        label = "train (one epoch)" if name == "train" else name
        ax_t.plot([r[xk] for r in rows], [r[yk] for r in rows], "o-", label=label)
        ax_m.plot([r[xk] for r in rows], [r["peak_rss_mb"] for r in rows], "o-", label=label)
    for ax, title in ((ax_t, "wall seconds (log)"), (ax_m, "peak RSS, MB (linear: flat or growing)")):
        ax.set_xscale("log")
        ax.set_xlabel("images (N)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax_t.set_yscale("log")
    ax_m.set_ylim(bottom=0)
    fig.suptitle(f"mixem-fast on {data.get('device', {}).get('name', 'this machine')}: cost against N")
    fig.tight_layout()
    fig.savefig(path, format="svg")
    plt.close(fig)
    return path
