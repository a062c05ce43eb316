"""load_images on every supported format, written from real images in each dataset's own on-disk layout."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from dataset_writers import cifar_rows, write_cifar_batch, write_idx, write_png, write_stl
from PIL import Image

from mixem import data
from mixem.data import ImageSet, load_images
from mixem.errors import DataError

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def luma(rgb_nhwc: np.ndarray) -> np.ndarray:
    """PIL's "L" conversion (ITU-R 601-2 with its integer rounding), the rule load_images follows."""
    return np.stack([np.asarray(Image.fromarray(x).convert("L")) for x in rgb_nhwc])


# ---------------------------------------------------------------- embedded default and fashion-mnist


def test_embedded_default_is_fashion_mnist_test_split(fashion):
    s = load_images(None, image_size=28, in_channels=1)
    assert isinstance(s, ImageSet) and len(s) == 10_000
    assert s.images.shape == (10_000, 1, 28, 28) and s.images.dtype == torch.uint8
    assert s.labels.dtype == np.int64 and np.bincount(s.labels).tolist() == [1000] * 10
    assert s.class_names == [
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
    assert s.paths is None and s.skipped == []
    np.testing.assert_array_equal(s.images[:, 0].numpy(), fashion[0])
    np.testing.assert_array_equal(s.labels, fashion[1])


def test_embedded_as_rgb_replicates_and_resizes(fashion):
    s = load_images(None, image_size=32, in_channels=3, max_images=64)
    assert s.images.shape == (64, 3, 32, 32)
    assert torch.equal(s.images[:, 0], s.images[:, 1]) and torch.equal(s.images[:, 0], s.images[:, 2])
    # 28 -> 32 keeps the picture: the mean brightness moves by less than one grey level per image.
    diff = s.images[:, 0].float().mean((1, 2)) - torch.tensor(fashion[0][:64]).float().mean((1, 2))
    assert diff.abs().max() < 1.0
    assert s.labels.tolist() == fashion[1][:64].tolist()


@pytest.mark.skipif(
    not DEBIAN_FMNIST.is_dir(), reason="dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)"
)
def test_fashion_mnist_debian_package_matches_embedded_split(fashion):
    full = load_images("fashion-mnist", image_size=28, in_channels=1)
    assert full.images.shape == (70_000, 1, 28, 28) and np.bincount(full.labels).tolist() == [7000] * 10
    test = load_images("fashion-mnist:test", image_size=28, in_channels=1)
    np.testing.assert_array_equal(test.images[0, 0].numpy(), fashion[0][0])
    np.testing.assert_array_equal(test.images[:, 0].numpy(), fashion[0])
    train = load_images("fashion-mnist", split="train", image_size=28, in_channels=1, max_images=5)
    assert torch.equal(train.images, full.images[:5])
    assert train.class_names[0] == "T-shirt/top"


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist.*embedded"):
        load_images("fashion-mnist", image_size=28, in_channels=1)


def test_embedded_has_no_train_split():
    with pytest.raises(DataError, match="fashion-mnist"):
        load_images(None, image_size=28, in_channels=1, split="train")


# ---------------------------------------------------------------- IDX


@pytest.fixture
def idx_dir(tmp_path, fashion):
    x, y = fashion
    d = tmp_path / "mnist"
    d.mkdir()
    write_idx(d / "train-images-idx3-ubyte.gz", x[:300])
    write_idx(d / "train-labels-idx1-ubyte.gz", y[:300])
    write_idx(d / "t10k-images-idx3-ubyte", x[300:500])  # raw, as after gunzip
    write_idx(d / "t10k-labels-idx1-ubyte", y[300:500])
    return d


@pytest.mark.parametrize(
    "split,rows", [("train", (0, 300)), ("test", (300, 500)), ("all", (0, 500)), ("auto", (0, 500))]
)
def test_idx_splits(idx_dir, fashion, split, rows):
    s = load_images(str(idx_dir), image_size=28, in_channels=1, split=split)
    np.testing.assert_array_equal(s.images[:, 0].numpy(), fashion[0][slice(*rows)])
    np.testing.assert_array_equal(s.labels, fashion[1][slice(*rows)])
    assert s.class_names == [str(i) for i in range(10)]  # nothing says these are Fashion-MNIST


def test_idx_images_file_with_labels_beside_and_max_images(idx_dir, fashion):
    s = load_images(f"idx:{idx_dir / 'train-images-idx3-ubyte.gz'}", image_size=28, in_channels=1, max_images=7)
    np.testing.assert_array_equal(s.images[:, 0].numpy(), fashion[0][:7])
    np.testing.assert_array_equal(s.labels, fashion[1][:7])
    both = load_images(str(idx_dir), image_size=28, in_channels=1, max_images=305)
    np.testing.assert_array_equal(both.labels, fashion[1][:305])  # spans the train and test files


def test_idx_only_test_split_present(tmp_path, fashion):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", fashion[0][:20])
    s = load_images(str(tmp_path), image_size=28, in_channels=1)
    assert len(s) == 20 and s.labels is None  # no labels file beside it
    with pytest.raises(DataError, match="train-images"):
        load_images(str(tmp_path), image_size=28, in_channels=1, split="train")


@pytest.mark.parametrize("damage", ["cut_raw", "cut_gz", "header", "magic"])
def test_idx_damaged_file_names_it(idx_dir, damage):
    name = "t10k-images-idx3-ubyte" if damage in ("cut_raw", "magic", "header") else "train-images-idx3-ubyte.gz"
    f = idx_dir / name
    raw = f.read_bytes()
    if damage == "magic":
        f.write_bytes(b"\x00\x00\x08\x01" + raw[4:])
    elif damage == "header":
        f.write_bytes(raw[:10])
    else:
        f.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=name.replace(".", r"\.")):
        load_images(str(idx_dir), image_size=28, in_channels=1)


# ---------------------------------------------------------------- image folders


@pytest.fixture
def messy_folder(tmp_path, fashion, tiles):
    """Class folders of real PNG and JPEG images, plus every kind of file a real folder holds by accident."""
    root = tmp_path / "imgs"
    good = {}
    for k in range(6):
        good[f"coat/{k:02d}.png"] = fashion[0][k]
        write_png(root / f"coat/{k:02d}.png", fashion[0][k])
    colour = tiles(5, 40)
    for k in range(5):
        rel = f"photo/deep/nest/{k}.JPG" if k % 2 else f"photo/{k}.jpeg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(colour[k]).save(root / rel, quality=95, subsampling=0)
        good[rel] = colour[k]
    write_png(root / "shoe/a.PNG", np.ascontiguousarray(fashion[0][9]))
    good["shoe/a.PNG"] = fashion[0][9]
    buf = io.BytesIO()
    Image.fromarray(colour[0]).save(buf, "JPEG")
    jpeg = buf.getvalue()
    png = (root / "coat/00.png").read_bytes()
    bad = {
        "coat/corrupt.jpg": jpeg[:2] + b"\x00" * 200 + jpeg[202:],  # header destroyed
        "coat/truncated.png": png[: len(png) // 2],
        "photo/empty.jpg": b"",
        "shoe/notes.jpg": b"this is a text file, not a JPEG\n",
    }
    for rel, content in bad.items():
        (root / rel).write_bytes(content)
    (root / "coat/.hidden.png").write_bytes(png)
    (root / "coat/._00.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (root / "shoe/x.jpg").mkdir()
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints/00.png").write_bytes(png)
    (root / "photo/readme.txt").write_text("not an image")
    os.symlink(root, root / "coat" / "loop")  # a link back to the root must not load anything twice
    return root, good, bad


def test_folder_loads_good_images_once_and_reports_bad_ones(messy_folder):
    root, good, bad = messy_folder
    s = load_images(str(root), image_size=40, in_channels=3, threads=3)
    rel = [Path(p).relative_to(root).as_posix() for p in s.paths]
    assert sorted(rel) == sorted(good) and len(rel) == len(set(rel))
    assert rel == sorted(rel)  # deterministic order
    assert sorted(Path(p).relative_to(root).as_posix() for p, _ in s.skipped) == sorted(bad)
    assert all(reason for _, reason in s.skipped)
    assert s.class_names == ["coat", "photo", "shoe"]
    assert [s.class_names[i] for i in s.labels] == [r.split("/")[0] for r in rel]
    assert s.images.shape == (len(good), 3, 40, 40)
    for r, img in zip(rel, s.images):
        ref = good[r]
        if ref.ndim == 2:  # grayscale PNG, 28 -> 40, replicated to RGB
            assert torch.equal(img[0], img[1]) and torch.equal(img[0], img[2])
        else:  # colour JPEG at its own size: exactly what PIL decodes, and close to the photo crop
            decoded = np.asarray(Image.open(root / r).convert("RGB"))
            np.testing.assert_array_equal(img.numpy().transpose(1, 2, 0), decoded)
            assert np.abs(decoded.astype(int) - ref).mean() < 3
    assert s.source == f"image folder {root}"


def test_folder_png_is_pixel_exact_at_native_size(messy_folder, fashion):
    root, good, _ = messy_folder
    s = load_images(str(root / "coat"), image_size=28, in_channels=1)
    assert s.labels is None  # loose files, no class sub-folders
    np.testing.assert_array_equal(s.images[:, 0].numpy(), fashion[0][:6])


def test_folder_max_images_replaces_unreadable_files_in_order(messy_folder):
    root, good, bad = messy_folder
    # In sorted order coat/ holds 00..05.png then corrupt.jpg and truncated.png; the 8th readable is photo/0.jpeg.
    s = load_images(str(root), image_size=16, in_channels=1, max_images=8, threads=2)
    rel = [Path(p).relative_to(root).as_posix() for p in s.paths]
    assert rel == [f"coat/{k:02d}.png" for k in range(6)] + ["photo/0.jpeg", "photo/2.jpeg"]
    assert len(s) == 8 and s.labels.tolist() == [0] * 6 + [1, 1]


def test_folder_without_labels_and_with_progress(messy_folder):
    root, good, _ = messy_folder
    seen = []
    s = load_images(str(root), image_size=16, in_channels=1, labels=False, progress=lambda d, t: seen.append((d, t)))
    assert s.labels is None and s.class_names is None
    assert seen[-1] == (len(good) + 4, len(good) + 4)  # every listed file, readable or not, counts as done


def test_folder_rgb_to_gray_matches_pil_and_array_path(tmp_path, tiles):
    rgb = tiles(6, 24)
    for k, t in enumerate(rgb):
        write_png(tmp_path / "f" / f"{k}.png", t)
    np.savez(tmp_path / "t.npz", x=rgb)
    a = load_images(str(tmp_path / "f"), image_size=24, in_channels=1)
    b = load_images(str(tmp_path / "t.npz"), image_size=24, in_channels=1)
    np.testing.assert_array_equal(a.images[:, 0].numpy(), luma(rgb))
    assert torch.equal(a.images, b.images)


def test_folder_resize_is_shorter_side_then_centre_crop(tmp_path, photos):
    photo = photos[1][:300, :450]  # 3:2 landscape
    write_png(tmp_path / "wide.png", photo)
    s = load_images(str(tmp_path), image_size=50, in_channels=3)
    centre = Image.fromarray(photo[:, 75:375]).resize((50, 50), Image.BILINEAR)
    assert np.abs(s.images[0].numpy().transpose(1, 2, 0).astype(int) - np.asarray(centre)).mean() < 1.5
    # The array path does the same crop and an antialiased resize: it agrees to within a grey level or two.
    np.savez(tmp_path / "wide.npz", x=photo[None])
    t = load_images(str(tmp_path / "wide.npz"), image_size=50, in_channels=3)
    assert (s.images.float() - t.images.float()).abs().mean() < 2


def test_folder_applies_exif_orientation(tmp_path, photos):
    photo = photos[0][:200, :300]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(photo).save(tmp_path / "rot.jpg", quality=95, exif=exif)
    s = load_images(str(tmp_path), image_size=64, in_channels=3)
    upright = np.asarray(Image.fromarray(photo).transpose(Image.Transpose.ROTATE_270).resize((200, 300)))
    upright = np.asarray(Image.fromarray(upright[50:250]).resize((64, 64), Image.BILINEAR))
    got = s.images[0].numpy().transpose(1, 2, 0).astype(int)
    assert np.abs(got - upright).mean() < 4


def test_folder_alpha_is_composited_on_white(tmp_path, fashion):
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = fashion[0][0]  # a garment silhouette as alpha over black
    write_png(tmp_path / "a.png", rgba)
    s = load_images(str(tmp_path), image_size=28, in_channels=1)
    assert s.images[0, 0, 0, 0] == 255 and s.images.min() < 100


def test_folder_decodes_a_thousand_jpegs_in_threads(tmp_path, tiles):
    src = tiles(40, 64)
    for k in range(1000):
        Image.fromarray(src[k % 40]).save(tmp_path / f"{k:04d}.jpg", quality=90)
    s = load_images(str(tmp_path), image_size=32, in_channels=3, threads=4)
    assert s.images.shape == (1000, 3, 32, 32) and not s.skipped
    assert torch.equal(s.images[0], s.images[40]) and not torch.equal(s.images[0], s.images[1])


def test_empty_or_unreadable_folder_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=str(tmp_path / "empty")):
        load_images(str(tmp_path / "empty"), image_size=28, in_channels=1)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk/a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="none of the 1 image files could be read"):
        load_images(str(tmp_path / "junk"), image_size=28, in_channels=1)
    with pytest.raises(DataError, match=f"{tmp_path / 'missing'}: no such file"):
        load_images(str(tmp_path / "missing"), image_size=28, in_channels=1)


def test_unsupported_file_lists_formats(tmp_path):
    (tmp_path / "list.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"list\.csv: not a supported data file.*npz.*cifar-10-batches-py"):
        load_images(str(tmp_path / "list.csv"), image_size=28, in_channels=1)


def test_bad_options(tmp_path, idx_dir):
    with pytest.raises(DataError, match="unknown split"):
        load_images(None, image_size=28, in_channels=1, split="val")
    (tmp_path / "f").mkdir()
    with pytest.raises(DataError, match="no 'train' split"):
        load_images(str(tmp_path / "f"), image_size=28, in_channels=1, split="train")
    with pytest.raises(DataError, match="looks like 'idx'"):
        load_images(f"stl10:{idx_dir}", image_size=28, in_channels=1)
    with pytest.raises(DataError, match="does not exist for IDX"):
        load_images(str(idx_dir), image_size=28, in_channels=1, split="unlabeled")


# ---------------------------------------------------------------- .npz


def test_npz_layouts_and_dtypes(tmp_path, digits, tiles):
    x, y = digits
    np.savez(tmp_path / "d.npz", x=x, y=y)
    s = load_images(str(tmp_path / "d.npz"), image_size=8, in_channels=1)
    np.testing.assert_array_equal(s.images[:, 0].numpy(), x)
    np.testing.assert_array_equal(s.labels, y)
    assert s.class_names == [str(i) for i in range(10)] and s.paths is None
    rgb = tiles(5, 16)
    np.savez(tmp_path / "nhwc.npz", images=rgb.astype(np.float32) / 255, labels=np.arange(5))
    np.savez(tmp_path / "nchw.npz", images=rgb.transpose(0, 3, 1, 2))
    for name in ("nhwc", "nchw"):
        s = load_images(str(tmp_path / f"{name}.npz"), image_size=16, in_channels=3)
        np.testing.assert_array_equal(s.images.numpy().transpose(0, 2, 3, 1), rgb)
    big = load_images(str(tmp_path / "d.npz"), image_size=32, in_channels=3, max_images=3)
    assert big.images.shape == (3, 3, 32, 32) and big.labels.tolist() == y[:3].tolist()


def test_npz_keras_splits_and_string_labels(tmp_path, digits):
    x, y = digits
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    np.savez(tmp_path / "k.npz", x_train=x[:100], y_train=names[y[:100]], x_test=x[100:150], y_test=names[y[100:150]])
    s = load_images(str(tmp_path / "k.npz"), image_size=8, in_channels=1)
    assert len(s) == 150 and [s.class_names[i] for i in s.labels] == names[y[:150]].tolist()
    t = load_images(str(tmp_path / "k.npz"), image_size=8, in_channels=1, split="test")
    np.testing.assert_array_equal(t.images[:, 0].numpy(), x[100:150])


def test_npz_errors_name_what_was_found(tmp_path, digits):
    np.savez(tmp_path / "w.npz", pixels=digits[0], target=digits[1])
    with pytest.raises(DataError, match="found keys: pixels, target"):
        load_images(str(tmp_path / "w.npz"), image_size=8, in_channels=1)
    np.savez(tmp_path / "flat.npz", x=digits[0].reshape(-1, 64))
    with pytest.raises(DataError, match=r"\(1797, 64\)"):
        load_images(str(tmp_path / "flat.npz"), image_size=8, in_channels=1)
    np.savez(tmp_path / "short.npz", x=digits[0], y=digits[1][:5])
    with pytest.raises(DataError, match="labels have shape"):
        load_images(str(tmp_path / "short.npz"), image_size=8, in_channels=1)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "w.npz").read_bytes()[:100])
    with pytest.raises(DataError, match=r"cut\.npz"):
        load_images(str(tmp_path / "cut.npz"), image_size=8, in_channels=1)


# ---------------------------------------------------------------- CIFAR-10 / CIFAR-100


@pytest.fixture
def cifar10(tmp_path, tiles):
    """cifar-10-batches-py with 5 train batches of 8 and a test batch of 8, from real photo crops."""
    x = tiles(48, 32)
    y = np.arange(48) % 10  # placeholder classes: the pixels are real, the labels only test the plumbing
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for b in range(6):
        name = f"data_batch_{b + 1}" if b < 5 else "test_batch"
        rows = slice(8 * b, 8 * b + 8)
        # The real files are Python 2 pickles (protocol 2); protocol 5 is what a re-save under numpy 2 gives.
        write_cifar_batch(
            d / name,
            {
                "batch_label": f"batch {b}".encode(),
                "labels": y[rows].tolist(),
                "data": cifar_rows(x[rows]),
                "filenames": [b"x.png"] * 8,
            },
            protocol=2 if b % 2 == 0 else 5,
        )
    names = [
        n.encode() for n in ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    ]
    write_cifar_batch(d / "batches.meta", {"label_names": names, "num_cases_per_batch": 8, "num_vis": 3072})
    return d, x, y


@pytest.mark.parametrize("split,rows", [("train", (0, 40)), ("test", (40, 48)), ("auto", (0, 48))])
def test_cifar10_splits_pixels_and_names(cifar10, split, rows):
    d, x, y = cifar10
    s = load_images(str(d.parent), image_size=32, in_channels=3, split=split)  # the parent folder works too
    np.testing.assert_array_equal(s.images.numpy().transpose(0, 2, 3, 1), x[slice(*rows)])
    np.testing.assert_array_equal(s.labels, y[slice(*rows)])
    assert s.class_names[0] == "airplane" and len(s.class_names) == 10


def test_cifar10_gray_and_max_images(cifar10):
    d, x, y = cifar10
    s = load_images(str(d), image_size=32, in_channels=1, max_images=11)
    np.testing.assert_array_equal(s.images[:, 0].numpy(), luma(x[:11]))
    assert s.labels.tolist() == y[:11].tolist()


def test_cifar10_missing_batch(cifar10):
    d, _, _ = cifar10
    (d / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_images(str(d), image_size=32, in_channels=3, split="train")
    assert len(load_images(str(d), image_size=32, in_channels=3)) == 40  # auto: what is there


class _Shell:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Eval:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("payload", ["system", "eval"])
def test_cifar_malicious_pickle_is_refused(cifar10, tmp_path, payload):
    d, _, _ = cifar10
    marker = tmp_path / "pwned"
    evil = _Shell(f"touch {marker}") if payload == "system" else _Eval()
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": evil, b"labels": [0]}, f, protocol=2)
    with pytest.raises(DataError, match=r"test_batch: not a CIFAR python batch \(refused"):
        load_images(str(d), image_size=32, in_channels=3, split="test")
    assert not marker.exists()


def test_cifar_truncated_batch(cifar10):
    d, _, _ = cifar10
    raw = (d / "test_batch").read_bytes()
    (d / "test_batch").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(DataError, match="test_batch"):
        load_images(str(d), image_size=32, in_channels=3, split="test")


@pytest.fixture
def cifar100(tmp_path, tiles):
    x = tiles(30, 32)
    fine = (np.arange(30) * 7) % 100
    coarse = fine // 5
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for name, rows in (("train", slice(0, 20)), ("test", slice(20, 30))):
        write_cifar_batch(
            d / name,
            {
                "data": cifar_rows(x[rows]),
                "fine_labels": fine[rows].tolist(),
                "coarse_labels": coarse[rows].tolist(),
                "filenames": [b"x.png"] * 10,
            },
        )
    write_cifar_batch(
        d / "meta",
        {
            "fine_label_names": [f"fine{i}".encode() for i in range(100)],
            "coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        },
    )
    return d, x, fine, coarse


def test_cifar100_fine_and_coarse(cifar100):
    d, x, fine, coarse = cifar100
    s = load_images(str(d.parent), image_size=32, in_channels=3)
    np.testing.assert_array_equal(s.images.numpy().transpose(0, 2, 3, 1), x)
    assert s.labels.tolist() == fine.tolist() and len(s.class_names) == 100
    c = load_images(f"cifar100-20:{d}", image_size=32, in_channels=3, split="test")
    assert c.labels.tolist() == coarse[20:].tolist() and c.class_names[3] == "coarse3"
    assert "CIFAR-100-20" in c.source


def test_parent_with_two_datasets_is_ambiguous(cifar10, cifar100):
    with pytest.raises(DataError, match="cifar-10-batches-py, cifar-100-python"):
        load_images(str(cifar10[0].parent), image_size=32, in_channels=3)


# ---------------------------------------------------------------- STL-10


@pytest.fixture
def stl10(tmp_path, tiles):
    x = tiles(22, 96)
    y = np.arange(22) % 10
    d = tmp_path / "stl10_binary"
    write_stl(d, "train", x[:10], y[:10])
    write_stl(d, "test", x[10:16], y[10:16])
    write_stl(d, "unlabeled", x[16:])
    return d, x, y


@pytest.mark.parametrize(
    "split,rows,labelled",
    [
        ("train", (0, 10), True),
        ("test", (10, 16), True),
        ("unlabeled", (16, 22), False),
        ("auto", (0, 16), True),
        ("all", (0, 22), False),
    ],
)
def test_stl10_splits_and_orientation(stl10, split, rows, labelled):
    d, x, y = stl10
    s = load_images(str(d.parent), image_size=96, in_channels=3, split=split)
    # Exact equality with the photo crops proves the column-major transpose (a transposed crop differs).
    np.testing.assert_array_equal(s.images.numpy().transpose(0, 2, 3, 1), x[slice(*rows)])
    if labelled:
        assert s.labels.tolist() == y[slice(*rows)].tolist() and s.class_names[7] == "monkey"
    else:
        assert s.labels is None and s.class_names is None


def test_stl10_resized_and_limited(stl10):
    d, x, _ = stl10
    s = load_images(str(d), image_size=32, in_channels=3, max_images=12)  # crosses from train into test
    assert s.images.shape == (12, 3, 32, 32)
    ref = np.stack([np.asarray(Image.fromarray(t).resize((32, 32), Image.BILINEAR)) for t in x[:12]])
    assert np.abs(s.images.numpy().transpose(0, 2, 3, 1).astype(int) - ref).mean() < 2


def test_stl10_truncated(stl10):
    d, _, _ = stl10
    raw = (d / "test_X.bin").read_bytes()
    (d / "test_X.bin").write_bytes(raw[:-100])
    with pytest.raises(DataError, match=r"test_X\.bin.*truncated"):
        load_images(str(d), image_size=32, in_channels=3, split="test")


def test_folder_reads_every_listed_format_losslessly(tmp_path, fashion):
    x = fashion[0][:6]
    for k, ext in enumerate(["bmp", "gif", "tif", "TIFF", "webp", "png"]):
        options = {"lossless": True} if ext == "webp" else {}
        Image.fromarray(x[k]).save(tmp_path / f"{k}.{ext}", **options)
    s = load_images(str(tmp_path), image_size=28, in_channels=1)
    assert not s.skipped
    np.testing.assert_array_equal(s.images[:, 0].numpy(), x)


def test_folder_16_bit_png_is_scaled_not_clipped(tmp_path, fashion):
    Image.fromarray(fashion[0][0].astype(np.uint16) * 257).save(tmp_path / "deep.png")
    s = load_images(str(tmp_path), image_size=28, in_channels=3)
    np.testing.assert_array_equal(s.images[0, 1].numpy(), fashion[0][0])


def test_fashion_mnist_bad_split_and_conflicting_split():
    with pytest.raises(DataError, match="unknown split 'val'"):
        load_images("fashion-mnist:val", image_size=28, in_channels=1)
    if DEBIAN_FMNIST.is_dir():
        with pytest.raises(DataError, match="split option says 'train'"):
            load_images("fashion-mnist:test", image_size=28, in_channels=1, split="train")


def test_npz_class_names_must_cover_labels(tmp_path, digits):
    x, y = digits
    np.savez(tmp_path / "n.npz", x=x, y=y, class_names=np.array(["zero", "one"]))
    with pytest.raises(DataError, match="label 9 but only 2 class names"):
        load_images(str(tmp_path / "n.npz"), image_size=8, in_channels=1)
    names = np.array([str(i) * 2 for i in range(10)])
    np.savez(tmp_path / "ok.npz", x=x, y=y, class_names=names)
    assert load_images(str(tmp_path / "ok.npz"), image_size=8, in_channels=1).class_names[3] == "33"


def test_probe_and_the_cpu_preset_follow_the_data(tmp_path, tiles, fashion):
    """The cpu preset keeps colour for colour photos and takes the images' side, capped at 32 px."""
    from mixem.data import probe
    from mixem.session import build_configs

    colour, gray = tmp_path / "colour", tmp_path / "gray"
    for i, t in enumerate(tiles(12, 48)):
        (colour / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(t).save(colour / f"c{i % 2}" / f"{i}.jpg")
    gray.mkdir()
    for i, im in enumerate(fashion[0][:12]):  # grayscale pictures saved as RGB JPEGs: still gray
        Image.fromarray(im[0]).convert("RGB").resize((20, 20)).save(gray / f"{i}.jpg")
    (gray / "broken.jpg").write_bytes(b"not a jpeg")  # passed over by the probe
    assert probe(str(colour)) == (3, 48) and probe(str(gray)) == (1, 20) and probe(None) == (1, 28)
    m, _, _ = build_configs("cpu", None, {}, {"data": str(colour)})
    assert (m.in_channels, m.image_size, len(m.mean)) == (3, 32, 3)
    m, _, _ = build_configs("cpu", None, {}, {"data": str(gray)})
    assert (m.in_channels, m.image_size) == (1, 20)
    m, _, _ = build_configs("cpu", None, {"in_channels": 1, "image_size": None}, {"data": str(colour)})
    assert (m.in_channels, m.image_size) == (1, 28)  # an explicit --channels or --image-size: the preset as written
    m, _, _ = build_configs("paper", None, {}, {"data": str(gray)})
    assert (m.in_channels, m.image_size) == (3, 32)  # the paper preset is the paper's


def test_small_data_gets_the_cpu_presets_steps_not_its_epochs(tmp_path):
    """The cpu preset's epochs are a floor in steps (min_steps): 1,797 images get as many updates as the
    10,000-image quickstart; epochs given explicitly are taken exactly; a resume recomputes the same."""
    import json

    from mixem.config import TrainConfig, with_min_steps
    from mixem.session import build_configs

    _, t, _ = build_configs("cpu", None, {}, {"data": None})
    assert (t.epochs, t.min_steps, t.refine_epochs, t.refine_min_steps) == (12, 900, 10, 750)
    assert with_min_steps(t, 10_000) == t  # the quickstart: 78 steps an epoch, 12 and 10 epochs reach both floors
    small = with_min_steps(t, 1797)  # 14 steps an epoch
    assert (small.epochs, small.refine_epochs) == (65, 54) and 65 * 14 >= 900 > 64 * 14 and 54 * 14 >= 750 > 53 * 14
    assert with_min_steps(small, 1797) == small  # idempotent: a resumed run trains the same epochs
    assert with_min_steps(TrainConfig(epochs=3, refine_epochs=0, min_steps=100), 50).refine_epochs == 0  # off stays off
    _, t, _ = build_configs("cpu", None, {}, {"data": None, "epochs": 5})
    assert (t.epochs, t.min_steps, t.refine_min_steps) == (5, 0, 750)  # --epochs: exactly 5
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"train": {"refine_epochs": 2}}))
    _, t, _ = build_configs("cpu", cfg, {}, {"data": None})
    assert (t.min_steps, t.refine_epochs, t.refine_min_steps) == (900, 2, 0)
    _, t, _ = build_configs("paper", None, {}, {"data": None})
    assert with_min_steps(t, 100) == t  # the paper preset trains its epochs as written
