"""A trained model loaded for Python: `mixem.load(...)`, then `.embed(images)` and `.predict(images)`.

Images may be file paths, PIL images, uint8 arrays or tensors (one image or a batch; HW, HWC, NHW, NHWC or
NCHW), or a list mixing them. Each is brought to the model's input as `embed` brings a file (folders.square:
shorter side resized, centre crop, the model's channels), then run through the engine in batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixem import classes, folders
from mixem.errors import ConfigError, DataError


@dataclass
class Prediction:
    """The class of each image (row-aligned with the input)."""

    classes: np.ndarray  # (N,) int64 class ids
    probability: np.ndarray  # (N,) float32 the probability of that class (see mixem.classes)
    distance: np.ndarray  # (N,) float32 squared L2 from the embedding to its class's centre (NaN without one)
    probs: np.ndarray  # (N, k) float32 every class's probability
    names: list[str] | None = None  # each image's class name, when the run's classes have names

    def __len__(self) -> int:
        return len(self.classes)


def _from_array(a: np.ndarray, size: int, channels: int) -> np.ndarray:
    """A uint8 (or [0, 1] float) array of one image or a batch as (N, C, size, size) uint8."""
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating) or a.size and not (np.nanmin(a) >= 0 and np.nanmax(a) <= 1):
            raise DataError(f"images as arrays must be uint8 (0..255) or floats in [0, 1], got {a.dtype}")
        a = np.rint(a * 255).astype(np.uint8)
    if a.ndim == 4 and a.shape[1] == channels and a.shape[2:] == (size, size):
        return np.ascontiguousarray(a)  # already the engine's input
    if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (1, 3, 4)):
        a = a[None]  # one image: HW or HWC
    if a.ndim == 4 and a.shape[1] in (1, 3) and a.shape[-1] not in (1, 3, 4):
        a = a.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    if a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[-1] not in (1, 3, 4)):
        raise DataError(f"cannot read an image array of shape {a.shape}: give HW, HWC, NHW, NHWC or NCHW")
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    a = a[..., 0] if a.ndim == 4 and a.shape[-1] == 1 else a
    return np.stack([folders.square(Image.fromarray(np.ascontiguousarray(im)), size, mode) for im in a])


def to_pixels(images, size: int, channels: int) -> np.ndarray:
    """Any supported image input (see the module docstring) as (N, channels, size, size) uint8."""
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    if type(images).__module__.startswith("torch"):
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray):
        return _from_array(images, size, channels)
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    out = []
    for im in images:
        if isinstance(im, (str, os.PathLike)):
            try:
                out.append(folders.decode(str(im), size, mode)[None])
            except Exception as e:  # noqa: BLE001 (PIL raises many types for one meaning: not a readable image)
                raise DataError(f"{im}: cannot read this image ({folders.failure(e)[1]})") from None
        elif isinstance(im, Image.Image):
            out.append(folders.square(im, size, mode)[None])
        else:
            out.append(to_pixels(im, size, channels))
    if not out:
        raise DataError("no images given")
    return np.concatenate(out)


class Model:
    """A checkpoint, run directory or exported model, ready to embed and classify images."""

    def __init__(self, path: str | os.PathLike, engine: str = "torch", device: str = "auto", batch_size: int = 256):
        from mixem.engines import load_engine

        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.path = Path(path)
        self.engine = load_engine(path, engine, device)
        self.batch_size = min(batch_size, self.engine.max_batch or batch_size)
        self.image_size, self.in_channels = self.engine.image_size, self.engine.in_channels
        self.classes = classes.read(path)

    def __repr__(self):
        how = self.classes.where if self.classes else classes.head_only(0).where
        return f"mixem.Model({str(self.path)!r}, engine={self.engine.name!r}, classes from {how})"

    def run(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(unit embeddings (N, D), head probabilities (N, K)) as float32 numpy arrays."""
        x = to_pixels(images, self.image_size, self.in_channels)
        emb, probs = [], []
        for s in range(0, len(x), self.batch_size):
            outs = self.engine(x[s : s + self.batch_size])
            emb.append(outs[0].float().cpu().numpy())
            probs.append(outs[1].float().cpu().numpy())
        return np.concatenate(emb), np.concatenate(probs)

    def embed(self, images) -> np.ndarray:
        """(N, D) float32 unit-norm embeddings: the vectors `embed` stores (in float32, not float16)."""
        return self.run(images)[0]

    def predict(self, images) -> Prediction:
        """The run's class of each image (mixem.classes: the classes its evaluation scored)."""
        emb, probs = self.run(images)
        cls = self.classes or classes.head_only(probs.shape[1])
        got = classes.assign(cls, emb, probs)
        names = [cls.name(int(c)) for c in got["class"]] if cls.names else None
        return Prediction(got["class"], got["probability"], got["distance"], got["probs"], names)


def load(path: str | os.PathLike, engine: str = "torch", device: str = "auto", batch_size: int = 256) -> Model:
    """A model to embed and classify images with: a run directory (its latest checkpoint), a checkpoint, or an
    exported model (engine "onnx": model.onnx or its export folder; "trt": model.plan)."""
    return Model(path, engine=engine, device=device, batch_size=batch_size)
