"""load_images: any supported image source (folder, npz, IDX, CIFAR, STL-10, embedded) as one uint8 tensor."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mixem import cifar_stl, folders, formats
from mixem.config import DATA_FORMATS, SPLITS
from mixem.errors import DataError

EMBEDDED_DIR = Path(__file__).parent / "data_files"  # the Fashion-MNIST test split, shipped as package data
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where `apt-get install dataset-fashion-mnist` puts it
SUPPORTED = (
    "an image folder (jpg, png, bmp, webp, gif, tif), an .npz with x/images, IDX files "
    "(MNIST, Fashion-MNIST), cifar-10-batches-py, cifar-100-python, stl10_binary, or 'fashion-mnist'"
)
_CHUNK = 2048  # images fitted per step: bounds the float copy interpolate makes (2048x3x96x96 floats = 226 MB)


@dataclass
class ImageSet:
    """Images at the model's size and channels, with whatever labels and names the source carries."""

    images: torch.Tensor  # (N, C, H, W) uint8, H = W = image_size, C = in_channels
    labels: np.ndarray | None = None  # (N,) int64 indices into class_names; None when the source has none
    class_names: list[str] | None = None  # name of each label index
    paths: list[str] | None = None  # image folders: the file of each image; array formats: None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) for unreadable files
    source: str = ""  # one line: what was loaded, from where

    def __len__(self) -> int:
        return self.images.shape[0]


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(n, 1|3, H, W) uint8 to `channels`: luminance as PIL's "L" (ITU-R 601-2, its rounding) or replication."""
    if x.shape[1] == channels:
        return x
    if channels == 3:
        return x.expand(-1, 3, -1, -1)
    r, g, b = x.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)[:, None]


def to_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """(n, C, H, W) uint8 to size x size: centre square crop, then antialiased bilinear resize (as folders do)."""
    H, W = x.shape[-2:]
    if H == W == size:
        return x
    side = min(H, W)
    top, left = (H - side) // 2, (W - side) // 2
    x = x[..., top : top + side, left : left + side].float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def fit(
    parts: list[np.ndarray], size: int, channels: int, progress: Callable[[int, int], None] | None = None
) -> torch.Tensor:
    """Concatenate (n, C, H, W) uint8 parts into one (N, channels, size, size) tensor, chunk by chunk."""
    total = sum(len(p) for p in parts)
    out = torch.empty((total, channels, size, size), dtype=torch.uint8)
    at = 0
    for p in parts:
        for i in range(0, len(p), _CHUNK):
            x = torch.from_numpy(np.array(p[i : i + _CHUNK]))  # a copy: parts may be read-only or memory-mapped
            x = to_size(to_channels(x, channels), size)
            out[at : at + len(x)] = x
            at += len(x)
            if progress is not None:
                progress(at, total)
    return out


def _parse(source: str, split: str, fmt: str | None) -> tuple[str, Path, str]:
    """Split "FORMAT:PATH" and "fashion-mnist[:SPLIT]" into (format or "", path, split)."""
    head, sep, rest = source.partition(":")
    if head.lower() == "fashion-mnist" and not Path(source).exists():  # a local folder of that name wins
        if sep and rest not in SPLITS:
            raise DataError(f"data {source!r}: unknown split {rest!r}; use fashion-mnist:train, :test or :all")
        if sep and split not in ("auto", rest):
            raise DataError(f"data {source!r} names split {rest!r} but the split option says {split!r}")
        if not FASHION_MNIST_DIR.is_dir() or not formats.idx_files(FASHION_MNIST_DIR):
            raise DataError(
                f"fashion-mnist: not found in {FASHION_MNIST_DIR}; install it with "
                "'apt-get install dataset-fashion-mnist', pass the folder holding its IDX files, "
                "or leave the data option unset to use the embedded 10,000-image test split"
            )
        return "idx", FASHION_MNIST_DIR, rest if sep else split
    if sep and head.lower() in DATA_FORMATS:
        fmt, source = head.lower(), rest
    return fmt or "", Path(source).expanduser(), split


def detect(path: Path) -> tuple[str, Path]:
    """The format of an existing path and the folder or file its reader takes."""
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return "npz", path
        try:
            with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
                head = f.read(4)
        except (OSError, EOFError):
            head = b""
        if head == b"\x00\x00\x08\x03":
            return "idx", path
        raise DataError(f"{path}: not a supported data file; give {SUPPORTED}")
    for sub, kind in (("cifar-10-batches-py", "cifar10"), ("cifar-100-python", "cifar100"), ("stl10_binary", "stl10")):
        if (path / sub).is_dir() and path.name != sub:
            found = [s for s in ("cifar-10-batches-py", "cifar-100-python", "stl10_binary") if (path / s).is_dir()]
            if len(found) > 1:
                raise DataError(f"{path}: holds {', '.join(found)}; point the data option at one of them")
            return kind, path / sub
    if any((path / f).is_file() for f in ("data_batch_1", "test_batch", "batches.meta")):
        return "cifar10", path
    if (path / "meta").is_file() and any((path / f).is_file() for f in ("train", "test")):
        return "cifar100", path
    if any((path / f"{s}_X.bin").is_file() for s in ("train", "test", "unlabeled")):
        return "stl10", path
    for d in (path, path / "raw"):
        if d.is_dir() and formats.idx_files(d):
            return "idx", d
    return "folder", path


def load_images(
    source: str | None,
    *,
    image_size: int,
    in_channels: int,
    split: str = "auto",
    labels: bool = True,
    max_images: int = 0,
    progress: Callable[[int, int], None] | None = None,
    format: str | None = None,
    threads: int = 0,
) -> ImageSet:
    """Load every image of `source` (None = the embedded Fashion-MNIST test split) at image_size, in_channels.

    source: a path, "FORMAT:PATH" (FORMAT one of config.DATA_FORMATS; e.g. "cifar100-20:DIR" for the 20 coarse
    classes), or "fashion-mnist[:SPLIT]" (the Debian dataset-fashion-mnist package).
    split: train | test | all | auto (all there is; STL-10: train+test, its clustering benchmark) |
    unlabeled (STL-10; STL-10's unlabeled and all carry no labels).
    max_images: keep the first N images in file order (folders: the first N readable), not a random sample.
    Folder labels are the first-level sub-folder names when every image lies in one; else there are none.
    progress(done, total) is called from this thread as images are decoded or resized.
    threads: image-decoding threads, 0 = one per available CPU.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if format is not None and format not in DATA_FORMATS:
        raise DataError(f"unknown data format {format!r}: choose one of {', '.join(DATA_FORMATS)}")
    if max_images < 0:
        raise DataError(f"max_images must be >= 0 (0 = all), got {max_images}")
    if source is None:
        if split not in ("auto", "test"):
            raise DataError(
                f"the embedded data is the Fashion-MNIST test split only, not {split!r}; "
                "use data 'fashion-mnist' (apt-get install dataset-fashion-mnist) for train"
            )
        arrays = formats.read_idx(EMBEDDED_DIR, "test", max_images, formats.FASHION_MNIST_CLASSES)
        arrays.source = "embedded Fashion-MNIST test split"
        return _finish(arrays, image_size, in_channels, labels, progress)
    fmt, path, split = _parse(str(source), split, format)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; give {SUPPORTED}")
    detected, where = detect(path)
    if fmt in ("cifar100", "cifar100-20") and detected == "cifar100":
        detected = fmt
    elif fmt and fmt != detected:
        raise DataError(f"{path}: asked for format {fmt!r} but this looks like {detected!r}")
    if detected == "folder":
        if not path.is_dir():
            raise DataError(f"{path}: not a supported data file; give {SUPPORTED}")
        if split not in ("auto", "all"):
            raise DataError(f"{path}: an image folder has no {split!r} split; point the data option at that folder")
        images, y, names, paths, skipped = folders.read_folder(
            path, image_size, in_channels, labels=labels, limit=max_images, threads=threads, progress=progress
        )
        return ImageSet(torch.from_numpy(images), y, names, paths, skipped, f"image folder {path}")
    return _finish(_read_arrays(detected, where, split, max_images), image_size, in_channels, labels, progress)


def _read_arrays(detected: str, where: Path, split: str, limit: int) -> formats.Arrays:
    """The reader of an array format (everything but folders)."""
    if detected == "idx":
        return formats.read_idx(where, split, limit)
    if detected == "npz":
        return formats.read_npz(where, split, limit)
    if detected == "stl10":
        return cifar_stl.read_stl10(where, split, limit)
    return cifar_stl.read_cifar(where, detected, split, limit)


PROBE_FILES = 64  # images looked at by probe()


def probe(source: str | None, split: str = "auto") -> tuple[int, int]:
    """(channels, side) of a data source from a sample of its images: 3 when any sampled image has colour
    (channels that differ, not gray stored as RGB), else 1; side = the median shorter side in pixels."""
    if source is None:
        return 1, 28
    fmt, path, split = _parse(str(source), split, None)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; give {SUPPORTED}")
    detected, where = detect(path)
    if fmt in ("cifar100", "cifar100-20"):
        detected = "cifar100"
    if detected == "folder":
        return folders.probe(path, PROBE_FILES)
    arrays = _read_arrays(detected, where, split, PROBE_FILES)
    x = np.concatenate([np.asarray(p[:PROBE_FILES]) for p in arrays.parts])[:PROBE_FILES]
    colour = x.shape[1] == 3 and bool(np.abs(x.astype(np.int16) - x[:, :1]).max() > 8)
    return (3 if colour else 1), int(min(x.shape[-2:]))


def _finish(arrays: formats.Arrays, size: int, channels: int, labels: bool, progress) -> ImageSet:
    images = fit(arrays.parts, size, channels, progress)
    if not len(images):
        raise DataError(f"{arrays.source}: holds no images")
    keep = labels and arrays.labels is not None
    names = arrays.class_names
    if keep and names is not None and len(arrays.labels) and arrays.labels.max() >= len(names):
        raise DataError(f"{arrays.source}: label {arrays.labels.max()} but only {len(names)} class names")
    return ImageSet(
        images, arrays.labels if keep else None, arrays.class_names if keep else None, None, [], arrays.source
    )
