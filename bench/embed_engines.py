"""Benchmark: images/s of each available inference engine (torch, onnxruntime, TensorRT) on the same uint8 batches."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import weakref

import numpy as np
import torch

NAME = "embed_engines"

_MODELS = {
    # A 28 px grayscale convnet (width 32; the cpu preset's is 16) and the paper's ResNet-18 at CIFAR size.
    "convnet32-28px": dict(
        backbone="convnet", width=32, image_size=28, in_channels=1, head_hidden=128, mean=(0.29,), std=(0.35,)
    ),
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


def not_measured(device) -> list[str]:
    """The engines this machine cannot run, and why; setup() leaves exactly these out."""
    out = []
    cuda = torch.device(device).type == "cuda"
    if not cuda:
        out.append(
            "torch autocast fp16 and onnxruntime's CUDA provider: CPU run (torch and onnxruntime run fp32 on the CPU)"
        )
        out.append("trt: TensorRT needs a CUDA GPU")
        return out
    if not _ort_cuda():
        out.append("onnx on CUDA: onnxruntime-gpu is not installed (pip install onnxruntime-gpu)")
    if importlib.util.find_spec("tensorrt") is None:
        out.append("trt: TensorRT is not installed (pip install --extra-index-url https://pypi.nvidia.com tensorrt)")
    return out


def _ort_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def setup(case: dict, device) -> dict:
    """Candidates over one random-init checkpoint (speed does not depend on the weights); torch first."""
    from mixem.checkpoint import save_checkpoint
    from mixem.engines import load_engine
    from mixem.export import export_onnx
    from mixem.export.tensorrt import build_trt_engine
    from mixem.model import MixEM

    device = torch.device(device)
    cuda = device.type == "cuda"
    tmp = tempfile.mkdtemp(prefix="mixem_bench_")
    cfg = _cfg(case)
    torch.manual_seed(0)
    save_checkpoint(f"{tmp}/ckpt", MixEM(cfg), cfg)
    xt = torch.from_numpy(_images(case)).to(device)  # on the GPU already when there is one: copies are not timed
    engines = {"torch": load_engine(f"{tmp}/ckpt", "torch", device)}
    # The engines' files live until the candidates are garbage-collected.
    weakref.finalize(engines["torch"], shutil.rmtree, tmp, True)
    if not cuda or _ort_cuda():
        for precision in ("fp32", "fp16"):
            out = f"{tmp}/onnx_{precision}"
            export_onnx(f"{tmp}/ckpt", out, fp16=precision == "fp16", parity_images=64)
            engines[f"onnx_{precision}"] = load_engine(out, "onnx", device)
    if cuda and importlib.util.find_spec("tensorrt") is not None:
        import tensorrt

        # TensorRT 11 has no fp16 builder flag: it needs the fp16 ONNX (strongly typed build).
        fp16_onnx = not hasattr(tensorrt.BuilderFlag, "FP16")
        out = f"{tmp}/trt"
        export_onnx(f"{tmp}/ckpt", out, fp16=fp16_onnx, parity_images=64)
        build_trt_engine(
            f"{out}/model.onnx",
            f"{out}/model.plan",
            fp16=True,
            opt_batch=case["batch"],
            max_batch=max(256, case["batch"]),
        )
        engines["trt_fp16"] = load_engine(out, "trt", device)
    # One-iteration callables on identical inputs; each engine validates and converts the same batch.
    return {name: (lambda e=e: e(xt)) for name, e in engines.items()}


def check(case: dict, candidates: dict) -> dict:
    """Every candidate's embeddings agree with the torch baseline (cosine) and so do its argmax-pi."""
    ref_e, ref_p = (t.float().cpu() for t in candidates["torch"]()[:2])
    result = {}
    for name, fn in candidates.items():
        if name == "torch":  # the baseline itself
            continue
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
    return {
        "flop": counter.get_total_flops() * B,
        "bytes": B * cfg.in_channels * cfg.image_size**2 + B * (cfg.embed_dim + cfg.components) * 4,
        "images": B,
    }
