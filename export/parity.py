"""Parity of an exported model against PyTorch on real images: cosine, prob error, argmax agreement."""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mixem.errors import MixEMError

# Gates per precision. Cosine is the metric that matters for embeddings (nearest neighbours and
# k-means see directions); probs are gated loosely because a softmax over K logits amplifies
# fp16 rounding, and argmax agreement is reported, never gated: a near-tie may flip legitimately.
THRESHOLDS = {
    "fp32": {"min_cosine": 0.9999, "max_prob_error": 1e-4},
    "fp16": {"min_cosine": 0.999, "max_prob_error": 1e-2},
}
# Mixed batch sizes so the check also exercises the dynamic batch axis (1 and an odd size).
PARITY_BATCHES = (1, 7, 64)


@lru_cache(maxsize=2)
def _fashion_mnist_test() -> np.ndarray:
    """The embedded Fashion-MNIST test images, uint8 (10000, 28, 28).

    A private IDX reader until mixem.data.load_images lands: export needs real images, not noise,
    because random inputs leave BatchNorm statistics and softmax ties untested.
    """
    raw = gzip.decompress(resources.files("mixem").joinpath("data_files/t10k-images-idx3-ubyte.gz").read_bytes())
    if int.from_bytes(raw[:4], "big") != 0x803:  # IDX magic: unsigned byte, 3 dimensions
        raise MixEMError("mixem/data_files/t10k-images-idx3-ubyte.gz: not an IDX3 ubyte file; reinstall mixem-fast")
    n, h, w = (int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(3))
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, h, w)


def real_images(n: int, image_size: int, in_channels: int) -> np.ndarray:
    """n real uint8 images (n, C, S, S) at the model's size: resized (antialiased) and channel-replicated."""
    x = torch.from_numpy(_fashion_mnist_test()[:n].copy()).unsqueeze(1)  # (n, 1, 28, 28)
    if x.shape[-1] != image_size:
        x = F.interpolate(x.float(), size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x.expand(-1, in_channels, -1, -1).contiguous().numpy()


def compare(reference: Callable, candidate: Callable, images: np.ndarray,
            batches: tuple[int, ...] = PARITY_BATCHES) -> dict:
    """Run both on the same images in chunks of the given batch sizes (cycled); report the agreement.

    reference/candidate: uint8 (B, C, H, W) ndarray -> (embedding, mixture_probs, ...) array-likes.
    """
    ref_e, ref_p, got_e, got_p, sizes = [], [], [], [], []
    i, j = 0, 0
    while i < len(images):
        b = min(batches[j % len(batches)], len(images) - i)
        x = images[i: i + b]
        r, c = reference(x), candidate(x)
        ref_e.append(_np(r[0])), ref_p.append(_np(r[1])), got_e.append(_np(c[0])), got_p.append(_np(c[1]))
        sizes.append(b)
        i, j = i + b, j + 1
    re, rp, ge, gp = (np.concatenate(a).astype(np.float64) for a in (ref_e, ref_p, got_e, got_p))
    cos = (re * ge).sum(1) / (np.linalg.norm(re, axis=1) * np.linalg.norm(ge, axis=1) + 1e-12)
    return {
        "images": int(len(images)),
        "batch_sizes": sorted(set(sizes)),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "max_embedding_error": float(np.abs(re - ge).max()),
        "max_prob_error": float(np.abs(rp - gp).max()),
        "argmax_agreement": float((rp.argmax(1) == gp.argmax(1)).mean()),
    }


def gate(report: dict, precision: str, min_cosine: float | None = None,
         max_prob_error: float | None = None) -> dict:
    """Add the thresholds and a pass/fail verdict to a compare() report (precision: fp32 | fp16)."""
    t = dict(THRESHOLDS[precision])
    if min_cosine is not None:
        t["min_cosine"] = float(min_cosine)
    if max_prob_error is not None:
        t["max_prob_error"] = float(max_prob_error)
    ok = report["min_cosine"] >= t["min_cosine"] and report["max_prob_error"] <= t["max_prob_error"]
    return {**report, "precision": precision, "thresholds": t, "passed": bool(ok)}


def failure_line(report: dict, what: str) -> str:
    t = report["thresholds"]
    return (f"{what} failed parity against PyTorch on {report['images']} real images: min cosine "
            f"{report['min_cosine']:.6f} (need >= {t['min_cosine']}), max prob error {report['max_prob_error']:.2e} "
            f"(need <= {t['max_prob_error']}); the model was not written")


def _np(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().float().cpu().numpy()
    return np.asarray(t, dtype=np.float32)
