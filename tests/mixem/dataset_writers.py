"""Writers for each dataset's own on-disk format (IDX, CIFAR python batches, STL-10 binaries, PNG), for tests."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def write_idx(path: Path, array: np.ndarray):
    """An IDX file (magic 0x0803 images / 0x0801 labels), gzipped when the name ends in .gz."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data, compresslevel=1) if path.suffix == ".gz" else data)


def write_cifar_batch(path: Path, batch: dict, protocol: int = 2):
    """A CIFAR python batch: bytes keys, 'data' (N, 3072) uint8 channel-major, as the dataset's own files."""
    with open(path, "wb") as f:
        pickle.dump({k.encode(): v for k, v in batch.items()}, f, protocol=protocol)


def cifar_rows(images_nhwc: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)).reshape(len(images_nhwc), -1)


def write_stl(folder: Path, name: str, images_nhwc: np.ndarray, labels: np.ndarray | None = None):
    """STL-10 binary: each image as 3 channels, each channel column-major (Matlab order); labels 1..10."""
    folder.mkdir(parents=True, exist_ok=True)
    x = images_nhwc.transpose(0, 3, 2, 1)  # (N, C, W, H): C-order bytes of this are column-major per channel
    (folder / f"{name}_X.bin").write_bytes(np.ascontiguousarray(x).tobytes())
    if labels is not None:
        (folder / f"{name}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())


def write_png(path: Path, array: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
