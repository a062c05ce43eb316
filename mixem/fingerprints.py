"""The near-duplicate descriptor of an image: the low 8 x 8 DCT frequencies of its luminance, as the model sees it.

This is pHash's measurement (Zauner 2010) kept as real numbers: the orthonormal 2-D DCT-II of the
luminance of the model's input (S x S pixels), its 8 x 8 lowest frequencies without the constant term (63
values, so a change of brightness does not count), scaled to unit length. Cosine similarity of two
descriptors is then the correlation of the two images low-pass filtered: resizing, re-encoding and small
colour changes move it little, different content moves it a lot.

Why not the model's embedding: after refinement the mixture embedding is close to one point per class, and
measured on the embedded Fashion-MNIST split (quickstart model) distinct images of a class have a median
nearest-neighbour cosine of 0.998 there, while an image and its 2x-resized copy can fall to 0.47 (an image
near a class border jumps to the other class's point); the backbone features behave alike (0.995 / 0.91).
The descriptor separates the two (README, "Near-duplicates").
"""

from __future__ import annotations

import functools

import numpy as np
import torch

N = 8  # frequencies kept per axis: N * N - 1 = 63 values
DIM = N * N - 1
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's "L"


@functools.lru_cache(maxsize=8)
def dct_matrix(size: int, n: int = N) -> np.ndarray:
    """(n, size) float32: the first n rows of the orthonormal DCT-II matrix of length `size`."""
    k = np.arange(n)[:, None]
    x = np.arange(size)[None]
    c = np.cos(np.pi * (2 * x + 1) * k / (2 * size)) * np.sqrt(2.0 / size)
    c[0] /= np.sqrt(2.0)
    return c.astype(np.float32)


def describe(images) -> np.ndarray:
    """(B, 63) float16 unit descriptors of uint8 (B, C, S, S) images (numpy or torch, any device); an image with
    no variation at these frequencies (a blank one) gets a zero row."""
    x = images.float() if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images, np.float32))
    if x.shape[1] == 3:
        w = torch.tensor(_LUMA, device=x.device)
        x = (x * w[None, :, None, None]).sum(1)
    else:
        x = x.mean(1)
    c = torch.from_numpy(dct_matrix(x.shape[-1])).to(x.device)
    d = (c @ x @ c.T).reshape(len(x), -1)[:, 1:]  # (B, 63): the constant term dropped
    norm = d.norm(dim=1, keepdim=True)
    d = torch.where(norm > 1e-3, d / norm.clamp(min=1e-12), torch.zeros_like(d))
    return d.cpu().numpy().astype(np.float16)
