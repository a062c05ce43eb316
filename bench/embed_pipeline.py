"""Benchmark: images/s of the whole embed pipeline vs pure PIL decode on all cores.

Also timed: each engine (torch, onnxruntime) alone on the decoded images. On a CPU decode and engine share
the cores, so the pipeline's bound there is 1 / (1/decode rate + 1/engine rate), not the decode rate: the
summary gives both ratios. The pipeline reaches the decode rate only where the engine runs elsewhere (GPU).
Memory over a long run is the embed_rss study.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from mixem import jpeg
from mixem.embed_decode import resolve_decoder

NAME = "embed_pipeline"
_MODELS = {
    # The CPU preset's model (what `mixem-fast train` makes on a CPU); and a convnet on 64 px RGB.
    "cpu-preset-28px-gray": "preset",
    "convnet32-64px-rgb": dict(backbone="convnet", width=32, image_size=64, in_channels=3, head_hidden=128),
}
_FOLDERS: dict = {}


def fashion_images(n: int) -> np.ndarray:
    from mixem.data import load_images

    return load_images(None, image_size=28, in_channels=1, max_images=n, labels=False).images[:, 0].numpy()


def write_jpegs(root: Path, n: int, photo_share: float = 2 / 3, seed: int = 0, native: bool = False) -> Path:
    """n real JPEGs: crops of scikit-learn's two sample photos resized to 128..512 px, and Fashion-MNIST
    items upscaled 4x (112 px); written once, in 100-file sub-folders. native: photos only, crops of
    360..427 x 360..640 px at the photos' own resolution (no resize)."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    fm = fashion_images(10_000)
    for i in range(n):
        d = root / f"{i // 100:05d}"
        if i % 100 == 0:
            d.mkdir(parents=True, exist_ok=True)
        if native:
            p = photos[i % 2]
            h, w = int(rng.integers(360, 428)), int(rng.integers(360, 641))
            t, left = rng.integers(0, p.shape[0] - h + 1), rng.integers(0, p.shape[1] - w + 1)
            im = Image.fromarray(p[t : t + h, left : left + w])
        elif rng.random() < photo_share:
            p = photos[i % 2]
            side = int(rng.integers(120, 420))
            t, left = rng.integers(0, p.shape[0] - side), rng.integers(0, p.shape[1] - side)
            out = int(rng.integers(128, 513))
            im = Image.fromarray(p[t : t + side, left : left + side]).resize((out, out), Image.BILINEAR)
        else:
            im = Image.fromarray(fm[i % len(fm)]).resize((112, 112), Image.BICUBIC)
        im.save(d / f"{i:07d}.jpg", quality=90)
    return root


def cases(quick: bool) -> list[dict]:
    if quick:
        return [{"model": "cpu-preset-28px-gray", "files": "mixed", "images": 400, "batch": 128}]
    return [
        {"model": "cpu-preset-28px-gray", "files": "mixed", "images": 2000, "batch": 256},
        {"model": "cpu-preset-28px-gray", "files": "photos", "images": 1000, "batch": 256},
        {"model": "convnet32-64px-rgb", "files": "mixed", "images": 1000, "batch": 256},
    ]


def _folder(n: int, files: str = "mixed") -> Path:
    if (n, files) not in _FOLDERS:
        tmp = Path(tempfile.mkdtemp(prefix="mixem_bench_jpegs_"))
        _FOLDERS[n, files] = write_jpegs(tmp / "imgs", n, native=files == "photos")
        atexit.register(shutil.rmtree, tmp, True)
    return _FOLDERS[n, files]


def not_measured(device) -> list[str]:
    import torch

    return [
        "inputs: JPEGs generated from scikit-learn's two sample photos and Fashion-MNIST, written once to a "
        "temporary folder; not a photo corpus. files=mixed: 2/3 photo crops resized to 128-512 px, 1/3 "
        "Fashion-MNIST items upscaled to 112 px; files=photos: photo crops 360-427 x 360-640 px, not resized",
        "nvJPEG GPU decode (decode_nvjpeg candidate): needs a CUDA GPU"
        if torch.device(device).type != "cuda"
        else "the pipeline on a GPU decodes with nvJPEG (decoder auto); decode is the PIL ceiling",
        "TensorRT engine: needs TensorRT and a GPU",
    ]


def summarize(case: dict, records: dict) -> dict:
    """Per engine: the shared-core bound 1 / (1/decode + 1/engine) and the pipeline's share of it and of decode."""
    rate = {k: r.get("images_per_s") for k, r in records.items() if r.get("status") == "ok"}
    out = {}
    for eng in ("torch", "onnx"):
        d, e, p = rate.get("decode"), rate.get(f"engine_{eng}"), rate.get(f"pipeline_{eng}")
        if d and e and p:
            bound = 1.0 / (1.0 / d + 1.0 / e)
            out[eng] = {
                "shared_core_bound_images_per_s": round(bound, 1),
                "pipeline_vs_bound": round(p / bound, 3),
                "pipeline_vs_decode": round(p / d, 3),
                "bound_vs_decode": round(bound / d, 3),
            }
    return out


def setup(case: dict, device) -> dict:
    import torch

    from mixem import shards
    from mixem.checkpoint import save_checkpoint
    from mixem.config import PRESETS, MixEMConfig
    from mixem.embed import EmbedOptions, embed_folder
    from mixem.embed_decode import decode_nvjpeg
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

    def decode_with(decoder: str):  # a ceiling: the decoder on every core, nothing else
        def run():
            images, kept, skipped = decode_files(paths, cfg.image_size, cfg.in_channels, decoder=decoder)
            return len(kept), len(skipped)

        return run

    decoded = decode_files(paths, cfg.image_size, cfg.in_channels)[0]
    _STATE.update(paths=paths, cfg=cfg, torch_model=models["torch"], device=device)

    def engine_only(engine):  # the model alone on the same images, already decoded: the other half of the work
        def run():
            for s in range(0, len(decoded), case["batch"]):
                engine(decoded[s : s + case["batch"]])
            return len(decoded), 0

        return run

    def pipeline(eng, decoder="auto"):  # listing, manifest, decode, engine, shard files: a fresh output every call
        opts = EmbedOptions(engine=eng, batch_size=case["batch"], shard_size=1000, device=str(device), decoder=decoder)

        def run():
            out = tmp / f"out_{eng}_{decoder}"
            shutil.rmtree(out, ignore_errors=True)
            s = embed_folder(models[eng], root, out, opts)
            return s["embedded"], s["skipped"]

        return run

    atexit.register(shutil.rmtree, tmp, True)
    cands = {"decode": decode_with("pil")}
    if jpeg.available():
        cands["decode_simplejpeg"] = decode_with("simplejpeg")
    if torch.device(device).type == "cuda":

        def nvjpeg():  # batched GPU decode (+ resize) of the same files, the pipeline's decoder there
            bad = 0
            for s in range(0, len(paths), case["batch"]):
                _, status = decode_nvjpeg(
                    paths[s : s + case["batch"]], cfg.image_size, cfg.in_channels, torch.device(device)
                )
                bad += sum(st != shards.OK for st, _ in status)
            return len(paths) - bad, bad

        cands["decode_nvjpeg"] = nvjpeg
    for eng, path in models.items():
        cands[f"engine_{eng}"] = engine_only(load_engine(path, eng, device))
        cands[f"pipeline_{eng}"] = pipeline(eng)  # decoder auto: what `embed` runs by default (PIL on a CPU)
        if jpeg.available():
            cands[f"pipeline_{eng}_simplejpeg"] = pipeline(eng, "simplejpeg")
    return cands


_STATE: dict = {}


def check(case: dict, candidates: dict) -> dict:
    n = case["images"]
    assert candidates["decode"]() == (n, 0), "pure decode did not read every file"
    for name, fn in candidates.items():
        assert fn() == (n, 0), f"{name} did not handle every file"
    import torch

    return {
        "images": n,
        "decoder_auto": resolve_decoder("auto", torch.device(_STATE["device"])),
        **_decoder_parity(),
        "torch_threads": torch.get_num_threads(),
        "cpus": len(os.sched_getaffinity(0)),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average": os.getloadavg(),
    }


def _decoder_parity() -> dict:
    """simplejpeg's pixels and the torch engine's embeddings of them against PIL's, gated like an fp32 export
    (export/parity.py: min cosine 0.9999); {} without simplejpeg."""
    from export.parity import THRESHOLDS
    from mixem.engines import load_engine
    from mixem.folders import decode_files

    if not jpeg.available():
        return {}
    paths, cfg = _STATE["paths"], _STATE["cfg"]
    pil = decode_files(paths, cfg.image_size, cfg.in_channels, decoder="pil")[0]
    sj = decode_files(paths, cfg.image_size, cfg.in_channels, decoder="simplejpeg")[0]
    diff = np.abs(pil.astype(np.int16) - sj.astype(np.int16))
    engine = load_engine(_STATE["torch_model"], "torch", _STATE["device"])
    ref, got = engine(pil), engine(sj)
    report = {
        "min_cosine": float(_cos(ref[0], got[0]).min()),
        "mean_cosine": float(_cos(ref[0], got[0]).mean()),
        "argmax_agreement": float((np.asarray(ref[1]).argmax(1) == np.asarray(got[1]).argmax(1)).mean()),
    }
    return {
        "simplejpeg_vs_pil": {
            "pixels_max_abs_diff": int(diff.max()),
            "pixels_mean_abs_diff": float(diff.mean()),
            "pixels_identical_share": float((diff == 0).mean()),
            **report,
            "fp32_min_cosine_gate": THRESHOLDS["fp32"]["min_cosine"],
            "within_fp32_parity": report["min_cosine"] >= THRESHOLDS["fp32"]["min_cosine"],
        }
    }


def _cos(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def work(case: dict) -> dict:
    return {"images": case["images"]}  # the harness turns this into images_per_s per candidate
