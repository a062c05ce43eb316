"""Near-duplicates: planted exact and resized copies among real images are all found, and nothing else; the
partitioned search is exact (equal to brute force); duplicates.parquet is readable by pandas."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from dataset_writers import write_png
from PIL import Image

from mixem import duplicates, fingerprints
from mixem.checkpoint import save_checkpoint
from mixem.clustering import cluster_run
from mixem.config import MixEMConfig
from mixem.embed import EmbedOptions, embed_folder
from mixem.model import MixEM


def _save(im: Image.Image, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, fashion, tiles):
    """300 Fashion-MNIST items and 40 photo crops (real, none a near-duplicate of another), plus copies:
    exact, 2x and 1.5x upscaled, re-encoded as JPEG, halved, one image with two copies (a group of three).
    Returns (root, the expected pairs as sorted relative-path tuples)."""
    root = tmp_path_factory.mktemp("dups") / "imgs"
    photo = tiles(40, 64)
    for k in range(300):
        write_png(root / f"fm/{k:03d}.png", fashion[0][k])
    for k in range(40):
        _save(Image.fromarray(photo[k]), root / f"photo/{k:02d}.png")
    pairs = []

    def plant(orig: str, copy: str, im: Image.Image, **kw):
        _save(im, root / copy, **kw)
        pairs.append(tuple(sorted((orig, copy))))

    for k in range(0, 5):
        plant(f"fm/{k:03d}.png", f"copies/fm_exact_{k}.png", Image.fromarray(fashion[0][k]))
    for k in range(5, 10):
        plant(
            f"fm/{k:03d}.png", f"copies/fm_up2_{k}.png", Image.fromarray(fashion[0][k]).resize((56, 56), Image.BICUBIC)
        )
    for k in range(10, 15):
        im = Image.fromarray(fashion[0][k]).resize((42, 42), Image.BICUBIC)
        plant(f"fm/{k:03d}.png", f"copies/fm_up15_{k}.jpg", im, quality=95)
    for k in range(0, 5):
        plant(f"photo/{k:02d}.png", f"copies/photo_exact_{k}.png", Image.fromarray(photo[k]))
    for k in range(5, 10):
        im = Image.fromarray(photo[k]).resize((32, 32), Image.BICUBIC)
        plant(f"photo/{k:02d}.png", f"copies/photo_half_{k}.jpg", im, quality=90)
    for k in range(10, 15):
        plant(f"photo/{k:02d}.png", f"copies/photo_up_{k}.png", Image.fromarray(photo[k]).resize((100, 100)))
    # A group of three: fm/020 and two copies of it (three pairs).
    plant("fm/020.png", "copies/fm20_a.png", Image.fromarray(fashion[0][20]))
    plant("fm/020.png", "copies/fm20_b.jpg", Image.fromarray(fashion[0][20]).resize((56, 56)), quality=92)
    pairs.append(("copies/fm20_a.png", "copies/fm20_b.jpg"))
    return root, sorted(pairs)


@pytest.mark.parametrize("channels, side", [(1, 28), (3, 32)])
def test_every_planted_copy_is_found_and_no_other_pair(planted, tmp_path, channels, side):
    root, want = planted
    cfg = MixEMConfig(backbone="convnet", width=8, image_size=side, in_channels=channels, head_hidden=16,
                      mean=(0.3,) * channels, std=(0.3,) * channels)  # fmt: skip
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ckpt", MixEM(cfg), cfg)
    out = tmp_path / "emb"
    embed_folder(str(tmp_path / "ckpt"), root, out, EmbedOptions(batch_size=64, shard_size=100))
    s = cluster_run(out, 5, report=False)  # the default threshold
    table = pq.read_table(out / "duplicates.parquet")
    got = sorted(tuple(sorted(p)) for p in zip(table.column("path_a").to_pylist(), table.column("path_b").to_pylist()))
    assert got == want  # every planted pair, and no pair of two different real images
    assert s["duplicates"]["pairs"] == len(want) and s["duplicates"]["threshold"] == duplicates.DEFAULT_THRESHOLD
    assert min(table.column("similarity").to_pylist()) >= duplicates.DEFAULT_THRESHOLD
    assert s["duplicates"]["groups"] == len(want) - 2  # the group of three holds three pairs
    by_pair = {
        tuple(sorted(p)): g for *p, g in zip(*(table.column(c).to_pylist() for c in ("path_a", "path_b", "group")))
    }
    trio = {g for p, g in by_pair.items() if "fm/020.png" in p or "copies/fm20_a.png" in p}
    assert len(trio) == 1 and list(by_pair.values()).count(trio.pop()) == 3
    df = pd_read(out / "duplicates.parquet")
    assert list(df.columns[:3]) == ["path_a", "path_b", "similarity"] and len(df) == len(want)


def pd_read(path):
    pd = pytest.importorskip("pandas", reason="pandas not installed")
    return pd.read_parquet(path)


def test_partitioned_search_equals_brute_force(fashion):
    """The per-cell search with the bisector bound finds exactly the pairs of all-against-all, on real images."""
    fp = fingerprints.describe(fashion[0][:, None]).astype(np.float32)
    for t in (0.99, 0.995, 0.998):
        a = duplicates.find(fp, t)  # 10,000 rows: all against all
        b = duplicates.find(fp, t, brute_max=100)  # cell by cell
        assert "Voronoi" in b.how and "all rows against all" in a.how
        np.testing.assert_array_equal(a.i, b.i)
        np.testing.assert_array_equal(a.j, b.j)
        np.testing.assert_array_equal(a.similarity, b.similarity)
        assert len(a.i) > 0 and (a.similarity >= t).all()
    # The pairs against a plain numpy reading of the definition (cosine >= t over every pair), at one threshold.
    unit = fp / np.linalg.norm(fp, axis=1, keepdims=True)
    sim = unit[:2000] @ unit[:2000].T
    i, j = np.nonzero(np.triu(sim >= 0.99, 1))
    c = duplicates.find(fp[:2000], 0.99, brute_max=10)
    assert set(zip(c.i.tolist(), c.j.tolist())) == set(zip(i.tolist(), j.tolist()))


def test_fingerprints_ignore_brightness_and_resizing(fashion):
    x = fashion[0][:50, None]
    a = fingerprints.describe(x).astype(np.float32)
    brighter = np.clip(x.astype(np.int32) * 1.1 + 10, 0, 255).astype(np.uint8)
    b = fingerprints.describe(brighter).astype(np.float32)
    assert (np.einsum("ij,ij->i", a, b) > 0.999).all()
    assert not fingerprints.describe(np.full((1, 1, 28, 28), 77, np.uint8)).any()  # a blank image: a zero row
    assert a[0] @ a[1] < 0.9  # two different items are far apart


def test_a_folder_of_mostly_copies_still_clusters(planted, tmp_path, monkeypatch):
    """More pairs than a near-duplicate list should hold (a folder of many copies of few images, or a threshold
    far too low) is said in the log, metrics and report, and the clusters are still written: the scaling
    study's 1M images (70k Fashion-MNIST items, each ~14 times) stopped `cluster` here before."""
    root, want = planted
    cfg = MixEMConfig(
        backbone="convnet", width=8, image_size=28, in_channels=1, head_hidden=16, mean=(0.3,), std=(0.3,)
    )
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ckpt", MixEM(cfg), cfg)
    out = tmp_path / "emb"
    embed_folder(str(tmp_path / "ckpt"), root, out, EmbedOptions(batch_size=64, shard_size=100))
    monkeypatch.setattr(duplicates, "MAX_PAIRS", len(want) - 1)  # the planted pairs are one too many
    s = cluster_run(out, 5, report=True)
    info = s["duplicates"]
    assert not info["available"] and f"more than {len(want) - 1:,} pairs reach cosine" in info["why"]
    assert (out / "clusters.parquet").is_file() and not (out / "duplicates.parquet").exists()
    assert "none listed: more than" in (out / "report.html").read_text()


@pytest.mark.parametrize("brute_max", [10_000, 100])
def test_too_many_pairs_stop_the_search_early(monkeypatch, brute_max):
    """Past MAX_PAIRS the search stops at once (TooManyPairs) rather than collecting every pair first: both the
    all-against-all search and the per-cell one, and the pairs it held when it stopped stay near the cap."""
    rng = np.random.default_rng(1)
    items = rng.standard_normal((40, 32)).astype(np.float32)
    v = np.repeat(items, 100, axis=0) + 1e-4 * rng.standard_normal((4000, 32)).astype(np.float32)  # 198,000 pairs
    held = []
    real = duplicates._search

    def spy(v_, queries, members, threshold, out, total, within=False):
        try:
            return real(v_, queries, members, threshold, out, total, within)
        finally:
            held.append(sum(len(f[0]) for f in out))

    monkeypatch.setattr(duplicates, "_search", spy)
    assert len(duplicates.find(v, 0.99, brute_max=brute_max).i) == 40 * 100 * 99 // 2
    monkeypatch.setattr(duplicates, "MAX_PAIRS", 5000)
    monkeypatch.setattr(duplicates, "QUERIES", (100, 100))
    held.clear()
    with pytest.raises(duplicates.TooManyPairs, match="more than 5,000 pairs reach cosine 0.99"):
        duplicates.find(v, 0.99, brute_max=brute_max)
    assert held and held[-1] <= 5000 + 100 * 100  # the cap plus at most one chunk of 100 queries' hits
