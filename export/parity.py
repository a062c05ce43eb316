"""Parity of an exported model against PyTorch on real images: cosine, prob error, argmax agreement."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch

# Gates per precision. Cosine is the metric that matters for embeddings (nearest neighbours and
# k-means see directions); probs are gated loosely because a softmax over K logits amplifies
# fp16 rounding, and argmax agreement is reported, never gated: a near-tie may flip legitimately.
THRESHOLDS = {
    "fp32": {"min_cosine": 0.9999, "max_prob_error": 1e-4},
    "fp16": {"min_cosine": 0.999, "max_prob_error": 1e-2},
}
# Mixed batch sizes so the check also exercises the dynamic batch axis (1 and an odd size).
PARITY_BATCHES = (1, 7, 64)


@lru_cache(maxsize=4)
def real_images(n: int, image_size: int, in_channels: int) -> np.ndarray:
    """The first n embedded Fashion-MNIST test images as uint8 (n, C, S, S) at the model's size and channels.

    Real images, not noise: random inputs leave BatchNorm statistics and softmax near-ties untested.
    Cached (callers must not write into it): export checks and benchmarks ask for the same images.
    """
    from mixem.data import load_images

    x = load_images(None, image_size=image_size, in_channels=in_channels, max_images=n, labels=False).images
    return x.contiguous().numpy()


def compare(
    reference: Callable, candidate: Callable, images: np.ndarray, batches: tuple[int, ...] = PARITY_BATCHES
) -> dict:
    """Run both on the same images in chunks of the given batch sizes (cycled); report the agreement.

    reference/candidate: uint8 (B, C, H, W) ndarray -> (embedding, mixture_probs, ...) array-likes.
    """
    ref_e, ref_p, got_e, got_p, sizes = [], [], [], [], []
    i, j = 0, 0
    while i < len(images):
        b = min(batches[j % len(batches)], len(images) - i)
        x = images[i : i + b]
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


def gate(report: dict, precision: str, min_cosine: float | None = None, max_prob_error: float | None = None) -> dict:
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
    return (
        f"{what} failed parity against PyTorch on {report['images']} real images: min cosine "
        f"{report['min_cosine']:.6f} (need >= {t['min_cosine']}), max prob error {report['max_prob_error']:.2e} "
        f"(need <= {t['max_prob_error']}); the model was not written"
    )


def _np(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().float().cpu().numpy()
    return np.asarray(t, dtype=np.float32)
