"""Readers for IDX (MNIST, Fashion-MNIST) and .npz datasets into uint8 NCHW arrays, and what every reader returns."""

from __future__ import annotations

import gzip
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixem.errors import DataError

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


@dataclass
class Arrays:
    """What a reader found: images as parts (views, possibly memory-mapped) to be fitted part by part."""

    parts: list[np.ndarray]  # each (n, C, H, W) uint8; not necessarily contiguous or in memory
    labels: np.ndarray | None  # (N,) int64 over all parts, or None
    class_names: list[str] | None
    source: str  # one line: which dataset, split and path


def names_for(labels: np.ndarray | None) -> list[str] | None:
    return None if labels is None or not len(labels) else [str(i) for i in range(int(labels.max()) + 1)]


def take(parts: list[np.ndarray], labels: list[np.ndarray] | None, limit: int):
    """Keep the first `limit` images across the parts, in order (0 = all)."""
    if limit:
        kept, left = [], limit
        for p in parts:
            if left <= 0:
                break
            kept.append(p[:left])
            left -= len(kept[-1])
        parts = kept
    lab = None
    if labels is not None:
        lab = np.concatenate(labels).astype(np.int64)[: sum(len(p) for p in parts)]
    return parts, lab


# ---------------------------------------------------------------- IDX (MNIST / Fashion-MNIST)

_IDX_IMAGES = re.compile(r"^(train|t10k)-images[-.]idx3-ubyte(\.gz)?$")
_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _open_idx(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_idx(path: Path, magic: int, dims: int, limit: int) -> np.ndarray:
    """One IDX file as uint8 (n, *shape); reads only the first `limit` items when limit > 0."""
    what = "image" if dims == 3 else "label"
    try:
        with _open_idx(path) as f:
            header = f.read(4 + 4 * dims)
            if len(header) < 4 + 4 * dims:
                raise DataError(f"{path}: truncated IDX file (header is {len(header)} bytes); re-download it")
            got = int.from_bytes(header[:4], "big")
            if got != magic:
                raise DataError(f"{path}: not an IDX {what} file (magic number {got:#010x}, expected {magic:#010x})")
            shape = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
            n = min(shape[0], limit) if limit else shape[0]
            want = n * int(np.prod(shape[1:], dtype=np.int64))
            data = f.read(want)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read IDX {what} file ({e}); it may be truncated, re-download it") from None
    if len(data) < want:
        raise DataError(f"{path}: truncated IDX {what} file ({len(data)} of {want} data bytes); re-download it")
    return np.frombuffer(data, np.uint8).reshape(n, *shape[1:])


def _idx_labels_for(images: Path) -> Path | None:
    name = images.name.replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1")
    return images.with_name(name) if name != images.name and images.with_name(name).is_file() else None


def idx_files(folder: Path) -> dict[str, Path]:
    """The IDX image files in a folder by split ("train", "test"); raw files preferred over .gz."""
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir(), key=lambda p: p.name.endswith(".gz")):
        m = _IDX_IMAGES.match(p.name)
        if m and p.is_file():
            found.setdefault("train" if m.group(1) == "train" else "test", p)
    return found


def read_idx(path: Path, split: str, limit: int, class_names: list[str] | None = None) -> Arrays:
    """A folder holding train-*/t10k-* IDX files, or one IDX images file (its labels file beside it)."""
    if path.is_file():
        files = {"file": path}
        if split not in ("auto", "all"):
            raise DataError(f"{path}: split {split!r} needs the folder holding the IDX files, not one file")
    else:
        found = idx_files(path)
        if split in ("auto", "all"):
            order = [s for s in ("train", "test") if s in found]
            if split == "all" and len(order) < 2:
                raise DataError(f"{path}: split 'all' needs both train-images and t10k-images IDX files here")
        elif split in ("train", "test"):
            if split not in found:
                raise DataError(f"{path}: no {_IDX_PREFIX[split]}-images-idx3-ubyte[.gz] file for split {split!r}")
            order = [split]
        else:
            raise DataError(f"{path}: split {split!r} does not exist for IDX data; use train, test, all or auto")
        files = {s: found[s] for s in order}
    parts, labels, left = [], [], limit
    for img in files.values():
        if limit and left <= 0:
            break
        x = _read_idx(img, 0x803, 3, left if limit else 0)
        parts.append(x[:, None])
        left -= len(x)
        lab_path = _idx_labels_for(img)
        if lab_path is None:
            labels = None
        elif labels is not None:
            y = _read_idx(lab_path, 0x801, 1, len(x))
            if len(y) != len(x):
                raise DataError(f"{lab_path}: {len(y)} labels for {len(x)} images in {img.name}")
            labels.append(y)
    parts, lab = take(parts, labels, limit)
    if lab is not None and class_names is None:
        class_names = FASHION_MNIST_CLASSES if "fashion" in str(path).lower() else names_for(lab)
    which = "+".join(files) if path.is_dir() else path.name
    kind = "Fashion-MNIST" if "fashion" in str(path).lower() else "IDX"
    return Arrays(parts, lab, class_names if lab is not None else None, f"{kind} {which} at {path}")


# ---------------------------------------------------------------- .npz

_FLAT_HINT = "save images as (N,H,W), (N,H,W,C) or (N,C,H,W)"


def _as_nchw_uint8(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[-1] in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)
        elif x.shape[1] not in (1, 3, 4):
            raise DataError(f"{where}: shape {x.shape} has no channel axis of 1, 3 or 4; {_FLAT_HINT}")
    else:
        raise DataError(f"{where}: images have shape {x.shape}; {_FLAT_HINT}")
    if x.shape[1] == 4:  # RGBA: the colour is the image; alpha is dropped
        x = x[:, :3]
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.bool_:
        return x.astype(np.uint8) * 255
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{where}: images have dtype {x.dtype}; use uint8 (0..255) or float (0..1)")
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if lo < 0 or hi > 255:
        raise DataError(f"{where}: pixel values span [{lo:g}, {hi:g}]; use uint8 (0..255) or float (0..1)")
    if np.issubdtype(x.dtype, np.floating):
        # Floats in [0, 1] are the usual convention; floats up to 255 are unscaled pixels.
        scale = 255.0 if hi <= 1.0 else 1.0
        return np.clip(np.rint(x.astype(np.float32) * scale), 0, 255).astype(np.uint8)
    return x.astype(np.uint8)


def _npz_labels(y: np.ndarray, n: int, where: str) -> tuple[np.ndarray, list[str] | None]:
    if y.shape != (n,):
        raise DataError(f"{where}: labels have shape {y.shape}, expected ({n},) to match the images")
    if y.dtype.kind in "US":
        names, inv = np.unique(y.astype(str), return_inverse=True)
        return inv.astype(np.int64), [str(s) for s in names]
    if y.dtype.kind == "f" and not np.all(np.mod(y, 1) == 0):
        raise DataError(f"{where}: labels must be whole numbers or strings, got non-integer floats")
    if y.dtype.kind not in "iuf" or (len(y) and y.min() < 0):
        raise DataError(f"{where}: labels must be non-negative integers or strings (dtype {y.dtype})")
    return y.astype(np.int64), None


def read_npz(path: Path, split: str, limit: int) -> Arrays:
    """Arrays x/images (+ y/labels), or Keras-style x_train/x_test (+ y_train/y_test) selected by split."""
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: a single .npy array, not an .npz archive; save with np.savez(path, x=..., y=...)")
        with z:
            keys = set(z.files)
            pairs = []
            for xk, yk in (("x", "y"), ("images", "labels")):
                if xk in keys:
                    pairs = [(xk, yk)]
                    break
            if pairs and split not in ("auto", "all"):
                raise DataError(f"{path}: split {split!r} needs arrays x_train/x_test; this file has one image array")
            if not pairs:
                wanted = {"train": ["train"], "test": ["test"]}.get(split, ["train", "test"])
                if split not in ("auto", "all", "train", "test"):
                    raise DataError(
                        f"{path}: split {split!r} does not exist for .npz data; use train, test, all or auto"
                    )
                pairs = [(f"x_{s}", f"y_{s}") for s in wanted if f"x_{s}" in keys]
                if not pairs or (split == "all" and len(pairs) < 2):
                    found = ", ".join(sorted(keys)) or "none"
                    raise DataError(
                        f"{path}: no image array for split {split!r}: expected key 'x' or 'images' "
                        f"(with 'y' or 'labels'), or 'x_train'/'x_test'; found keys: {found}"
                    )
            parts, ys = [], []
            for xk, yk in pairs:
                parts.append(_as_nchw_uint8(z[xk][: limit or None], f"{path}[{xk}]"))
                ys.append(z[yk][: limit or None] if yk in keys else None)
                if ys[-1] is not None and ys[-1].shape != (len(parts[-1]),):
                    raise DataError(
                        f"{path}[{yk}]: labels have shape {ys[-1].shape}, expected ({len(parts[-1])},) to match {xk}"
                    )
            labels, names = None, None
            if all(y is not None for y in ys):
                where = f"{path}[{'+'.join(yk for _, yk in pairs)}]"
                if len({y.dtype.kind in "US" for y in ys}) > 1:
                    raise DataError(f"{where}: some labels are strings and some numbers; use one kind")
                y, names = _npz_labels(np.concatenate(ys), sum(len(p) for p in parts), where)
                labels = [y]
                for key in ("class_names", "classes"):
                    if key in keys and names is None:
                        names = [str(s) for s in z[key]]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: cannot read .npz file ({e})") from None
    parts, lab = take(parts, labels, limit)
    if lab is not None and names is None:
        names = names_for(lab)
    return Arrays(parts, lab, names if lab is not None else None, f"npz {'+'.join(k for k, _ in pairs)} at {path}")


# ---------------------------------------------------------------- CIFAR-10 / CIFAR-100 python batches
