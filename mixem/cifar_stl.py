"""Readers for CIFAR-10/100 python batches (through an unpickler that admits only arrays) and STL-10 binaries."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from mixem.errors import DataError
from mixem.formats import Arrays, names_for, take

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def _numpy_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    allowed = {}
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):
            allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # Python 3 pickles bytes at protocol 2 as _codecs.encode(str, "latin1"): data, not code.
    allowed[("_codecs", "encode")] = __import__("_codecs").encode
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and lists only: any other global (os.system, eval...) is refused."""

    allowed = _numpy_globals()

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return self.allowed[(module, name)]


def _load_batch(path: Path) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: not a CIFAR python batch ({e}); only numpy arrays and lists are accepted") from None
    except Exception as e:  # a damaged pickle fails in many ways (EOFError, KeyError, struct.error...)
        raise DataError(
            f"{path}: cannot read CIFAR python batch ({type(e).__name__}: {e}); it may be truncated"
        ) from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: not a CIFAR python batch (a pickled {type(d).__name__}, expected a dict)")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in d.items()}


def _batch_images(d: dict, path: Path) -> np.ndarray:
    x = d.get("data")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {got}")
    return x.reshape(-1, 3, 32, 32)  # rows are channel-major: 1024 R, 1024 G, 1024 B


def _decode_names(v) -> list[str]:
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in v]


CIFAR_LAYOUT = {  # kind: (train files, test files, meta file, labels key, names key)
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", "labels", "label_names"),
    "cifar100": (["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
    "cifar100-20": (["train"], ["test"], "meta", "coarse_labels", "coarse_label_names"),
}


def read_cifar(folder: Path, kind: str, split: str, limit: int) -> Arrays:
    train, test, meta, label_key, names_key = CIFAR_LAYOUT[kind]
    if split in ("auto", "all"):
        files = [f for f in train + test if (folder / f).is_file()]
        if split == "all":
            missing = [f for f in train + test if f not in files]
            if missing:
                raise DataError(f"{folder}: split 'all' is missing {', '.join(missing)}")
    elif split in ("train", "test"):
        files = train if split == "train" else test
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise DataError(f"{folder}: split {split!r} is missing {', '.join(missing)}")
    else:
        raise DataError(f"{folder}: split {split!r} does not exist for {kind}; use train, test, all or auto")
    if not files:
        raise DataError(f"{folder}: no {kind} batch files ({', '.join(train + test)})")
    parts, labels, left = [], [], limit
    for name in files:
        if limit and left <= 0:
            break
        d = _load_batch(folder / name)
        x = _batch_images(d, folder / name)
        try:
            y = np.asarray(d.get(label_key, []), dtype=np.int64).reshape(-1)
        except (TypeError, ValueError) as e:
            raise DataError(f"{folder / name}: '{label_key}' is not a list of integers ({e})") from None
        if len(y) != len(x):
            raise DataError(f"{folder / name}: {len(y)} '{label_key}' for {len(x)} images")
        parts.append(x)
        labels.append(y)
        left -= len(x)
    parts, lab = take(parts, labels, limit)
    names = None
    if (folder / meta).is_file():
        names = _decode_names(_load_batch(folder / meta).get(names_key, [])) or None
    if names is None:
        names = CIFAR10_CLASSES if kind == "cifar10" else names_for(lab)
    label = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "cifar100-20": "CIFAR-100-20 (coarse)"}[kind]
    return Arrays(parts, lab, names, f"{label} {'+'.join(files)} at {folder}")


# ---------------------------------------------------------------- STL-10 binaries

_STL_SIDE = 96
_STL_SPLITS = {
    "train": ["train"],
    "test": ["test"],
    "unlabeled": ["unlabeled"],
    "all": ["train", "test", "unlabeled"],
    "auto": ["train", "test"],
}


def _stl_images(path: Path) -> np.ndarray:
    per = 3 * _STL_SIDE * _STL_SIDE
    size = path.stat().st_size
    if size == 0 or size % per:
        raise DataError(f"{path}: {size} bytes is not a whole number of 96x96x3 images; it may be truncated")
    # Each image is stored channel by channel, each channel column-major: transpose H and W to read it.
    m = np.memmap(path, dtype=np.uint8, mode="r", shape=(size // per, 3, _STL_SIDE, _STL_SIDE))
    return m.transpose(0, 1, 3, 2)


def read_stl10(folder: Path, split: str, limit: int) -> Arrays:
    """auto = train+test (the labelled 13,000, the usual clustering benchmark); unlabeled and all have no labels."""
    if split not in _STL_SPLITS:
        raise DataError(f"{folder}: split {split!r} does not exist for STL-10; use {', '.join(_STL_SPLITS)}")
    names = _STL_SPLITS[split]
    missing = [f"{s}_X.bin" for s in names if not (folder / f"{s}_X.bin").is_file()]
    if missing:
        raise DataError(f"{folder}: STL-10 split {split!r} is missing {', '.join(missing)}")
    parts, labels = [], []
    for s in names:
        x = _stl_images(folder / f"{s}_X.bin")
        parts.append(x)
        ypath = folder / f"{s}_y.bin"
        if s == "unlabeled" or labels is None:
            labels = None
            continue
        if not ypath.is_file():
            raise DataError(f"{ypath}: labels file missing for STL-10 split {s!r}")
        y = np.fromfile(ypath, dtype=np.uint8).astype(np.int64) - 1  # stored 1..10
        if len(y) != len(x) or (len(y) and (y.min() < 0 or y.max() > 9)):
            raise DataError(f"{ypath}: expected {len(x)} labels in 1..10, found {len(y)} in the file")
        labels.append(y)
    parts, lab = take(parts, labels, limit)
    class_names = None
    if lab is not None:
        txt = folder / "class_names.txt"
        class_names = txt.read_text().split() if txt.is_file() else STL10_CLASSES
    return Arrays(parts, lab, class_names, f"STL-10 {'+'.join(names)} at {folder}")
