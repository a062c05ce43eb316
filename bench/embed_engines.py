"""Benchmark: images/s of each available inference engine (torch, onnxruntime, TensorRT) on the same uint8 batches."""

from __future__ import annotations

import shutil
import tempfile
import weakref

import numpy as np
import torch

NAME = "embed_engines"
# What could not be run in the last setup() and why (TensorRT missing, no GPU provider, ...).
not_measured: list[str] = []

_MODELS = {
    # The CPU preset's model (mixem.config.PRESETS["cpu"]) and the paper's ResNet-18 at CIFAR size.
    "convnet32-28px": dict(backbone="convnet", width=32, image_size=28, in_channels=1, head_hidden=128,
                           mean=(0.29,), std=(0.35,)),
    "resnet18-32px": dict(backbone="resnet18", width=64, image_size=32, in_channels=3),
}


def cases(quick: bool) -> list[dict]:
    if quick:
        return [{"model": "convnet32-28px", "batch": 32}]
    return [{"model": m, "batch": b} for m in _MODELS for b in (64, 256)]


def _cfg(case):
    from mixem.config import MixEMConfig

    return MixEMConfig(**_MODELS[case["model"]])


def _images(case) -> np.ndarray:
    """Pre-decoded real images, so decoding is not timed: the first `batch` embedded test images."""
    from mixem.export.parity import real_images

    cfg = _cfg(case)
    return real_images(case["batch"], cfg.image_size, cfg.in_channels)


def setup(case: dict, device) -> dict:
    """Candidates over one random-init checkpoint (speed does not depend on the weights); torch first."""
    from mixem.checkpoint import save_checkpoint
    from mixem.errors import MixEMError
    from mixem.export import build_trt_engine, export_onnx, load_engine
    from mixem.model import MixEM

    device = torch.device("cuda" if str(device) == "auto" and torch.cuda.is_available() else
                          "cpu" if str(device) == "auto" else device)
    not_measured.clear()
    tmp = tempfile.mkdtemp(prefix="mixem_bench_")
    cfg = _cfg(case)
    torch.manual_seed(0)
    save_checkpoint(f"{tmp}/ckpt", MixEM(cfg), cfg)
    x = _images(case)
    xt = torch.from_numpy(x).to(device)  # on the GPU already when there is one: transfers are not timed
    engines = {"torch": load_engine(f"{tmp}/ckpt", "torch", device)}
    # Keep the engines' files until the candidates are garbage-collected.
    weakref.finalize(engines["torch"], shutil.rmtree, tmp, True)
    for precision in ("fp32", "fp16"):
        out = f"{tmp}/onnx_{precision}"
        export_onnx(f"{tmp}/ckpt", out, fp16=precision == "fp16", parity_images=64)
        try:
            engines[f"onnx_{precision}"] = load_engine(out, "onnx", device)
        except MixEMError as e:
            not_measured.append(f"onnx_{precision} on {device}: {e}")
    if device.type == "cuda":
        try:
            build_trt_engine(f"{tmp}/onnx_fp32/model.onnx", f"{tmp}/onnx_fp32/model.plan", fp16=True,
                             opt_batch=case["batch"], max_batch=max(256, case["batch"]))
            engines["trt_fp16"] = load_engine(f"{tmp}/onnx_fp32", "trt", device)
        except MixEMError as e:
            not_measured.append(f"trt: {e}")
    else:
        not_measured.append("trt: TensorRT needs a CUDA GPU; this run is on the CPU")
    if device.type == "cpu":
        not_measured.append("torch autocast fp16 and onnxruntime CUDA: CPU run")
    # One-iteration callables on identical inputs; each engine validates and converts the same batch.
    return {name: (lambda e=e: e(xt)) for name, e in engines.items()}


def check(case: dict, candidates: dict) -> dict:
    """Every candidate's embeddings agree with the torch baseline (cosine) and so do its argmax-pi."""
    ref_e, ref_p = (t.float().cpu() for t in candidates["torch"]()[:2])
    result = {}
    for name, fn in candidates.items():
        e, p = (t.float().cpu() for t in fn()[:2])
        cos = torch.nn.functional.cosine_similarity(e, ref_e).min().item()
        need = 0.999 if ("fp16" in name or torch.cuda.is_available()) else 0.9999
        if cos < need:
            raise AssertionError(f"{NAME}: {name} disagrees with torch: min cosine {cos:.6f} < {need}")
        result[name] = {"min_cosine": cos, "argmax_agreement": (p.argmax(1) == ref_p.argmax(1)).float().mean().item()}
    return result


def work(case: dict) -> dict:
    """FLOPs of one batch (counted by torch's FlopCounterMode on one image), bytes in and out, images."""
    from torch.utils.flop_counter import FlopCounterMode

    from mixem.model import InferenceModel, MixEM

    cfg = _cfg(case)
    model = InferenceModel(MixEM(cfg).eval())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size, dtype=torch.uint8))
    B = case["batch"]
    return {"flop": counter.get_total_flops() * B,
            "bytes": B * cfg.in_channels * cfg.image_size ** 2 + B * (cfg.embed_dim + cfg.components) * 4,
            "images": B}


if __name__ == "__main__":
    import argparse
    import time

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    try:
        from mixem.bench import run
    except ImportError:  # the shared harness (bench/harness.py) has not landed: time it plainly
        run = None
    if run is not None:
        print(run(NAME, quick=args.quick, out_dir=args.out, device=args.device))
    else:
        for case in cases(args.quick):
            cands = setup(case, args.device)
            print(case, check(case, cands), not_measured)
            for name, fn in cands.items():
                fn()
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < 2.0:
                    fn()
                    n += 1
                print(f"  {name:10s} {n * case['batch'] / (time.perf_counter() - t0):10.0f} images/s")
