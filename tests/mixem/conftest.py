"""Real sample images (embedded Fashion-MNIST, scikit-learn's photos and digits) and writers for each dataset format."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DATA_FILES = Path(__file__).resolve().parents[2] / "mixem" / "data_files"


def _parse_idx(path: Path) -> np.ndarray:
    # Parsed here independently of mixem.formats so the loader is checked against a second reading.
    raw = gzip.decompress(path.read_bytes())
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


@pytest.fixture(scope="session")
def fashion() -> tuple[np.ndarray, np.ndarray]:
    """The embedded Fashion-MNIST test split: (10000, 28, 28) uint8 images and (10000,) labels."""
    return (
        _parse_idx(DATA_FILES / "t10k-images-idx3-ubyte.gz"),
        _parse_idx(DATA_FILES / "t10k-labels-idx1-ubyte.gz").astype(np.int64),
    )


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    """scikit-learn's two sample photos (china.jpg, flower.jpg), 427x640 RGB."""
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)


@pytest.fixture(scope="session")
def tiles(photos):
    """tiles(n, side): n distinct real colour crops of the sample photos, (n, side, side, 3) uint8."""
    cache = {}

    def make(n: int, side: int) -> np.ndarray:
        if (n, side) not in cache:
            out = np.empty((n, side, side, 3), np.uint8)
            for k in range(n):
                photo = photos[k % 2]
                crop = 100 + (37 * k) % 300  # crop sides 100..399 px, so tiles differ in scale too
                top = (53 * k) % (photo.shape[0] - crop)
                left = (91 * k) % (photo.shape[1] - crop)
                im = Image.fromarray(photo[top : top + crop, left : left + crop])
                out[k] = np.asarray(im.resize((side, side), Image.BICUBIC))
            cache[(n, side)] = out
        return cache[(n, side)]

    return make


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits as uint8 0..255 and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.rint(d.images * (255 / 16)).astype(np.uint8), d.target.astype(np.int64)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """mixem.train on the first 600 embedded Fashion-MNIST images, refined: a TrainResult with classes.json."""
    from tiny import TINY_RUN

    import mixem

    return mixem.train(out=tmp_path_factory.mktemp("tiny_run") / "run", preset="cpu", **TINY_RUN)


@pytest.fixture
def extractions(monkeypatch) -> list[int]:
    """How many images each call of the real extract_features ran, in order, for as long as the test runs (it is
    counted where mixem.evaluate's callers and mixem.refine look it up)."""
    import mixem.evaluate
    import mixem.refine

    calls: list[int] = []
    real = mixem.evaluate.extract_features

    def counted(model, images, **kw):
        calls.append(len(images))
        return real(model, images, **kw)

    monkeypatch.setattr(mixem.evaluate, "extract_features", counted)
    monkeypatch.setattr(mixem.refine, "extract_features", counted)
    return calls
