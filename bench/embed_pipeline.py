"""Benchmark: images/s of the whole embed pipeline vs pure PIL decode on all cores (and RSS over a long run)."""

# Also timed: each engine (torch, onnxruntime) alone on the decoded images. On a CPU decode and engine share
# the cores, so the pipeline's bound there is 1 / (1/decode rate + 1/engine rate), not the decode rate: the
# summary gives both ratios. The pipeline reaches the decode rate only where the engine runs elsewhere (GPU).
# `python -m mixem.bench embed_pipeline [--quick]` runs the harness cases; `python -m mixem.bench.embed_pipeline
# --rss N` embeds N small files in a child process and samples its RSS per finished shard (flat memory).

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

NAME = "embed_pipeline"
_MODELS = {
    # The CPU preset's model (what `mixem-fast train` makes on a CPU); and a convnet on 64 px RGB.
    "cpu-preset-28px-gray": "preset",
    "convnet32-64px-rgb": dict(backbone="convnet", width=32, image_size=64, in_channels=3, head_hidden=128),
}
_FOLDERS: dict = {}


def _fashion(n: int) -> np.ndarray:
    from mixem.data import load_images

    return load_images(None, image_size=28, in_channels=1, max_images=n, labels=False).images[:, 0].numpy()


def write_jpegs(root: Path, n: int, photo_share: float = 2 / 3, seed: int = 0, native: bool = False) -> Path:
    """n real JPEGs: crops of scikit-learn's two sample photos resized to 128..512 px, and Fashion-MNIST
    items upscaled 4x (112 px); written once, in 100-file sub-folders. native: photos only, crops of
    360..427 x 360..640 px at the photos' own resolution (no resize)."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    fm = _fashion(10_000)
    for i in range(n):
        d = root / f"{i // 100:05d}"
        if i % 100 == 0:
            d.mkdir(parents=True, exist_ok=True)
        if native:
            p = photos[i % 2]
            h, w = int(rng.integers(360, 428)), int(rng.integers(360, 641))
            t, left = rng.integers(0, p.shape[0] - h + 1), rng.integers(0, p.shape[1] - w + 1)
            im = Image.fromarray(p[t: t + h, left: left + w])
        elif rng.random() < photo_share:
            p = photos[i % 2]
            side = int(rng.integers(120, 420))
            t, left = rng.integers(0, p.shape[0] - side), rng.integers(0, p.shape[1] - side)
            out = int(rng.integers(128, 513))
            im = Image.fromarray(p[t: t + side, left: left + side]).resize((out, out), Image.BILINEAR)
        else:
            im = Image.fromarray(fm[i % len(fm)]).resize((112, 112), Image.BICUBIC)
        im.save(d / f"{i:07d}.jpg", quality=90)
    return root


def cases(quick: bool) -> list[dict]:
    if quick:
        return [{"model": "cpu-preset-28px-gray", "files": "mixed", "images": 400, "batch": 128}]
    return [{"model": "cpu-preset-28px-gray", "files": "mixed", "images": 2000, "batch": 256},
            {"model": "cpu-preset-28px-gray", "files": "photos", "images": 1000, "batch": 256},
            {"model": "convnet32-64px-rgb", "files": "mixed", "images": 1000, "batch": 256}]


def _folder(n: int, files: str = "mixed") -> Path:
    if (n, files) not in _FOLDERS:
        tmp = Path(tempfile.mkdtemp(prefix="mixem_bench_jpegs_"))
        _FOLDERS[n, files] = write_jpegs(tmp / "imgs", n, native=files == "photos")
        atexit.register(shutil.rmtree, tmp, True)
    return _FOLDERS[n, files]


def not_measured(device) -> list[str]:
    import torch

    return ["inputs: JPEGs generated from scikit-learn's two sample photos and Fashion-MNIST, written once to a "
            "temporary folder; not a photo corpus. files=mixed: 2/3 photo crops resized to 128-512 px, 1/3 "
            "Fashion-MNIST items upscaled to 112 px; files=photos: photo crops 360-427 x 360-640 px, not resized",
            "nvJPEG GPU decode (decode_nvjpeg candidate): needs a CUDA GPU" if torch.device(device).type != "cuda"
            else "the pipeline on a GPU decodes with nvJPEG (decoder auto); decode is the PIL ceiling",
            "TensorRT engine: needs TensorRT and a GPU"]


def summarize(case: dict, records: dict) -> dict:
    """Per engine: the shared-core bound 1 / (1/decode + 1/engine) and the pipeline's share of it and of decode."""
    rate = {k: r.get("images_per_s") for k, r in records.items() if r.get("status") == "ok"}
    out = {}
    for eng in ("torch", "onnx"):
        d, e, p = rate.get("decode"), rate.get(f"engine_{eng}"), rate.get(f"pipeline_{eng}")
        if d and e and p:
            bound = 1.0 / (1.0 / d + 1.0 / e)
            out[eng] = {"shared_core_bound_images_per_s": round(bound, 1), "pipeline_vs_bound": round(p / bound, 3),
                        "pipeline_vs_decode": round(p / d, 3), "bound_vs_decode": round(bound / d, 3)}
    return out


def setup(case: dict, device) -> dict:
    import torch

    from mixem import shards
    from mixem.checkpoint import save_checkpoint
    from mixem.config import PRESETS, MixEMConfig
    from mixem.embed import EmbedOptions, decode_nvjpeg, embed_folder
    from mixem.engines import load_engine
    from mixem.export import export_checkpoint
    from mixem.folders import decode_files, list_images
    from mixem.model import MixEM

    root = _folder(case["images"], case.get("files", "mixed"))
    spec = _MODELS[case["model"]]
    cfg = MixEMConfig(**(PRESETS["cpu"]["model"] if spec == "preset" else spec))
    tmp = Path(tempfile.mkdtemp(prefix="mixem_bench_embed_"))
    torch.manual_seed(0)
    save_checkpoint(tmp / "ckpt", MixEM(cfg), cfg)
    export_checkpoint(tmp / "ckpt", "onnx", tmp / "onnx")  # fp32, parity-gated
    models = {"torch": str(tmp / "ckpt"), "onnx": str(tmp / "onnx")}
    paths = [str(root / r) for r in list_images(root)]

    def decode():  # the ceiling: PIL on every core, nothing else
        images, kept, skipped = decode_files(paths, cfg.image_size, cfg.in_channels)
        return len(kept), len(skipped)

    decoded = decode_files(paths, cfg.image_size, cfg.in_channels)[0]

    def engine_only(engine):  # the model alone on the same images, already decoded: the other half of the work
        def run():
            for s in range(0, len(decoded), case["batch"]):
                engine(decoded[s: s + case["batch"]])
            return len(decoded), 0
        return run

    def pipeline(eng):  # listing, manifest, decode, engine, shard files: a fresh output every call
        opts = EmbedOptions(engine=eng, batch_size=case["batch"], shard_size=1000, device=str(device))

        def run():
            out = tmp / f"out_{eng}"
            shutil.rmtree(out, ignore_errors=True)
            s = embed_folder(models[eng], root, out, opts)
            return s["embedded"], s["skipped"]
        return run

    atexit.register(shutil.rmtree, tmp, True)
    cands = {"decode": decode}
    if torch.device(device).type == "cuda":
        def nvjpeg():  # batched GPU decode (+ resize) of the same files, the pipeline's decoder there
            bad = 0
            for s in range(0, len(paths), case["batch"]):
                _, status = decode_nvjpeg(paths[s: s + case["batch"]], cfg.image_size, cfg.in_channels,
                                          torch.device(device))
                bad += sum(st != shards.OK for st, _ in status)
            return len(paths) - bad, bad
        cands["decode_nvjpeg"] = nvjpeg
    for eng, path in models.items():
        cands[f"engine_{eng}"] = engine_only(load_engine(path, eng, device))
        cands[f"pipeline_{eng}"] = pipeline(eng)
    return cands


def check(case: dict, candidates: dict) -> dict:
    n = case["images"]
    assert candidates["decode"]() == (n, 0), "pure decode did not read every file"
    for name, fn in candidates.items():
        assert fn() == (n, 0), f"{name} did not handle every file"
    import torch

    return {"images": n, "torch_threads": torch.get_num_threads(), "cpus": len(os.sched_getaffinity(0)),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_average": os.getloadavg()}


def work(case: dict) -> dict:
    return {"images": case["images"]}  # the harness turns this into images_per_s per candidate


# ---------------------------------------------------------------- RSS over a long run


def _rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_run(n: int, shard_size: int = 5000, out_json: Path | None = None) -> dict:
    """Embed n small real JPEGs (Fashion-MNIST, 28 px) with `mixem-fast embed` in a child process; sample
    its VmRSS every 0.1 s together with the number of finished shards (from the JSON log)."""
    import torch

    from mixem.checkpoint import save_checkpoint
    from mixem.config import PRESETS, MixEMConfig
    from mixem.model import MixEM

    tmp = Path(tempfile.mkdtemp(prefix="mixem_rss_"))
    try:
        t0 = time.perf_counter()
        fm = _fashion(10_000)
        for i in range(n):
            d = tmp / "imgs" / f"{i // 1000:05d}"
            if i % 1000 == 0:
                d.mkdir(parents=True)
            Image.fromarray(fm[i % len(fm)]).save(d / f"{i:07d}.jpg", quality=90)
        t_write = time.perf_counter() - t0
        cfg = MixEMConfig(**PRESETS["cpu"]["model"])
        torch.manual_seed(0)
        save_checkpoint(tmp / "ckpt", MixEM(cfg), cfg)
        log = tmp / "log.jsonl"
        cmd = [sys.executable, "-m", "mixem.cli", "embed", str(tmp / "ckpt"), str(tmp / "imgs"), "--out",
               str(tmp / "out"), "--shard-size", str(shard_size), "-q", "--json-log", str(log)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        samples = []
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                rss = _rss_kb(proc.pid)
                shards = log.read_text().count('"event": "shard"') if log.exists() else 0
                if rss is not None:
                    samples.append((round(time.perf_counter() - t0, 2), shards, rss))
                time.sleep(0.1)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        out, err = proc.communicate()
        stop.set()
        th.join()
        if proc.returncode != 0:
            raise RuntimeError(err.decode()[-2000:])
        summary = json.loads(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    per_shard = {}
    for _, s, rss in samples:
        per_shard[s] = max(per_shard.get(s, 0), rss)
    n_sh = max(per_shard) if per_shard else 0
    first = max(v for s, v in per_shard.items() if s <= 1) if per_shard else None
    res = {"files": n, "shard_size": shard_size, "seconds_writing_files": round(t_write, 1),
           "embed_seconds": summary["seconds"], "images_per_s": summary["images_per_s"],
           "peak_rss_mb": round(max(r for _, _, r in samples) / 1024, 1),
           "rss_mb_by_shards_done": {int(s): round(v / 1024, 1) for s, v in sorted(per_shard.items())},
           "rss_mb_after_first_shard": round(first / 1024, 1) if first else None,
           "rss_mb_last_shard": round(per_shard[n_sh] / 1024, 1) if per_shard else None,
           "how": "VmRSS of the `mixem-fast embed` child from /proc every 0.1 s; max per number of shards "
                  "finished (counted from the --json-log shard events)",
           "load_average": os.getloadavg()}
    if out_json:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rss", type=int, required=True, help="files to embed while sampling RSS")
    ap.add_argument("--shard-size", type=int, default=5000)
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the result")
    a = ap.parse_args()
    print(json.dumps(rss_run(a.rss, a.shard_size, a.out), indent=1))
