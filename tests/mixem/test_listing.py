"""The folder listing (issue 16 item 4): walked in sorted order and written one shard at a time, so `embed`'s
memory does not grow with the number of files; a resume compares the walk to files.parquet row group by row
group; only a changed folder builds the whole listing in memory."""

from __future__ import annotations

import os
import random

import pyarrow.parquet as pq
import pytest

from mixem import manifest
from mixem.folders import IMAGE_EXTENSIONS, iter_images

SETTINGS = dict(model="m", model_sha256="0" * 64, engine="torch", features="embedding", image_size=28,
                in_channels=1, follow_links=False)  # fmt: skip
# Names chosen to sort differently as whole paths than folder by folder when compared naively: characters
# below "/" (space ! - .), a folder and a file sharing a stem, unicode, digits of different lengths.
NAMES = ["a", "a-b", "a.b", "a b", "a!", "ab", "b", "Z", "é", "日本", "10", "9", "a.png", "a-.jpg", "x.PNG"]


def _tree(root, rng: random.Random, depth: int = 0) -> None:
    for name in rng.sample(NAMES, 8):
        if os.path.splitext(name)[1] or rng.random() < 0.4 or depth == 3:
            f = root / (name if os.path.splitext(name)[1] else name + rng.choice([".png", ".jpg", ".txt", ".JPEG"]))
            f.write_bytes(b"x" * rng.randrange(1, 50))
        else:
            (root / name).mkdir()
            _tree(root / name, rng, depth + 1)
    (root / ".hidden.png").write_bytes(b"x")


def _brute_force(root) -> list[str]:
    """Every image path under root, found by os.walk and sorted as strings: the definition of the listing."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, root)
        for n in filenames:
            if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS:
                found.append(n if rel == "." else f"{rel}/{n}")
    return sorted(found)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_walk_yields_the_sorted_listing(tmp_path, seed):
    _tree(tmp_path, random.Random(seed))
    want = _brute_force(tmp_path)
    assert len(want) > 20
    assert list(iter_images(tmp_path)) == want


def test_a_new_listing_is_written_one_shard_at_a_time_and_a_resume_reads_it_back_the_same_way(tmp_path, monkeypatch):
    root, out = tmp_path / "imgs", tmp_path / "out"
    root.mkdir()
    _tree(root, random.Random(3))
    want = _brute_force(root)

    def whole_listing(*a, **k):
        raise AssertionError("the whole listing was built in memory")

    monkeypatch.setattr(manifest, "scan", whole_listing)  # only a changed folder may build it
    m, changes = manifest.open_run(root, out, SETTINGS, shard_size=4)
    assert changes["new_run"] and m.n_files == len(want) == changes["added"]
    f = pq.ParquetFile(out / manifest.FILES)
    assert f.metadata.num_row_groups == m.n_shards == -(-len(want) // 4)
    t = f.read()
    assert t.column("path").to_pylist() == want and t.column("id").to_pylist() == list(range(len(want)))
    sizes = [os.stat(root / p).st_size for p in want]
    assert t.column("bytes").to_pylist() == sizes and not any(t.column("gone").to_pylist())
    assert manifest.load(out) == m  # the manifest describes the file written

    again, changes = manifest.open_run(root, out, SETTINGS, shard_size=4)  # resume: nothing changed
    assert again == m and changes == {"links_left_out": []}

    monkeypatch.undo()
    (root / want[len(want) // 2]).write_bytes(b"changed, longer than before: " * 4)  # one file modified
    with pytest.raises(manifest.ConfigError, match=r"changed since .* \(1 modified files"):
        manifest.open_run(root, out, SETTINGS, shard_size=4)
    (root / want[-1]).unlink()  # and one removed: --update marks it gone; a rerun then sees no change
    m2, changes = manifest.open_run(root, out, SETTINGS, shard_size=4, update=True)
    assert len(changes["modified"]) == 1 and changes["removed"] == [want[-1]]
    assert manifest.open_run(root, out, SETTINGS, shard_size=4) == (m2, {"links_left_out": []})


def test_an_empty_folder_leaves_nothing_behind(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "notes.txt").write_text("no images here")
    with pytest.raises(manifest.DataError, match="no image files found"):
        manifest.open_run(tmp_path / "imgs", tmp_path / "out", SETTINGS, shard_size=4)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
