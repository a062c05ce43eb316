"""Output folders (issue 15): one owner, nothing foreign adopted or overwritten, paths resolved, changes seen."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from dataset_writers import write_png

from mixem import manifest, owner, shards
from mixem.checkpoint import save_checkpoint
from mixem.clustering import cluster_run
from mixem.config import MixEMConfig
from mixem.embed import EmbedOptions, embed_folder
from mixem.errors import ConfigError, DataError, OutputFolderError
from mixem.model import MixEM
from mixem.search import search

CFG = dict(backbone="convnet", width=8, image_size=28, in_channels=1, head_hidden=16, mean=(0.29,), std=(0.35,))
OPTS = dict(batch_size=4, shard_size=4, workers=2)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "ckpt"
    torch.manual_seed(0)
    save_checkpoint(path, MixEM(MixEMConfig(**CFG)), MixEMConfig(**CFG))
    return path


def images(root, fashion, n: int, start: int = 0):
    for k in range(start, start + n):
        write_png(root / f"c{k % 2}/{k:03d}.png", fashion[0][k])
    return root


def rows(out) -> list[dict]:
    m = manifest.load(out)
    return [r for s in range(m.n_shards) for r in shards.read_shard(out, s)[1].to_pylist()]


def test_shards_of_another_run_are_never_adopted(model, fashion, tmp_path):
    """Finding 1: an --out holding another run's shards (no manifest, or another one) was taken as done."""
    a, b = images(tmp_path / "a", fashion, 14), images(tmp_path / "b", fashion, 8, start=100)
    out = tmp_path / "out"
    embed_folder(str(model), a, out, EmbedOptions(**OPTS))
    # (1) The manifest and listing deleted, the shards kept: the next run embeds its own 8 files, not 14 of a.
    (out / "manifest.json").unlink()
    (out / "files.parquet").unlink()
    s = embed_folder(str(model), b, out, EmbedOptions(**OPTS))
    assert s["complete"] and s["embedded"] == 8 and s["shards_done_now"] == 2
    got = rows(out)
    assert len(got) == 8 and all(r["image_path"].startswith(f"{b.resolve()}/") for r in got)
    # (2) Shards copied in from run a beside b's own manifest: cluster refuses them, embed redoes them.
    other = tmp_path / "other"
    embed_folder(str(model), a, other, EmbedOptions(**OPTS))
    for d in (shards.EMB_DIR, shards.META_DIR, shards.STATS_DIR):
        shutil.rmtree(out / d)
        shutil.copytree(other / d, out / d)
    with pytest.raises(DataError, match="another embedding run"):
        cluster_run(out, 2, report=False)
    s = embed_folder(str(model), b, out, EmbedOptions(**OPTS))
    assert s["shards_done_now"] == 2 and s["embedded"] == 8
    assert [r["image_path"] for r in rows(out)] == [r["image_path"] for r in got]
    # (3) Shards without a folder of ours around them (copied by hand): the folder is refused, untouched.
    loose = tmp_path / "loose"
    shutil.copytree(other / shards.EMB_DIR, loose / shards.EMB_DIR)
    with pytest.raises(OutputFolderError, match=r"not from a mixem-fast embed run \(embeddings\)"):
        embed_folder(str(model), b, loose, EmbedOptions(**OPTS))
    assert sorted(p.name for p in loose.iterdir()) == [shards.EMB_DIR]


def test_user_files_are_never_overwritten_or_deleted(model, fashion, tmp_path):
    """Finding 2: summary.json, files.parquet, bad_files.* of the user's were replaced; hidden *.tmp* files
    whose name held a shard number were deleted."""
    root = images(tmp_path / "imgs", fashion, 8)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.json").write_text("my notes")
    with pytest.raises(OutputFolderError, match=r"\(summary.json\)"):
        embed_folder(str(model), root, mine, EmbedOptions(**OPTS))
    assert [p.name for p in mine.iterdir()] == ["summary.json"] and (mine / "summary.json").read_text() == "my notes"
    out = tmp_path / "out"
    embed_folder(str(model), root, out, EmbedOptions(**OPTS))
    keep = [out / "embeddings" / ".draft_00001.tmp", out / "metadata" / ".x00001.tmp.bak", out / ".notes.tmp1"]
    for p in keep:
        p.write_text("the user's")
    (out / "stats" / "00001.json").unlink()  # shard 1 must be redone: its temporaries are cleaned
    (out / "embeddings" / ".img_emb_00001.npy.tmp999999").write_bytes(b"half a shard")
    embed_folder(str(model), root, out, EmbedOptions(**OPTS))
    assert all(p.read_text() == "the user's" for p in keep)
    assert not (out / "embeddings" / ".img_emb_00001.npy.tmp999999").exists()


HOLD = """
import sys
from mixem import owner
with owner.claim(sys.argv[1], "embed", command="embed"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_one_owner_at_a_time_and_a_killed_owner_is_stale(model, fashion, tmp_path):
    """Finding 3: two embed (or cluster) processes on one --out both ran."""
    root = images(tmp_path / "imgs", fashion, 8)
    out = tmp_path / "out"
    embed_folder(str(model), root, out, EmbedOptions(**OPTS))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for run in (
            lambda: embed_folder(str(model), root, out, EmbedOptions(**OPTS)),
            lambda: cluster_run(out, 2, report=False),
        ):
            with pytest.raises(OutputFolderError, match=rf"in use by `embed` \(pid {holder.pid} on "):
                run()
        assert not (out / "cluster.set.json").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert owner.read_lock(out)["state"] == "running"  # what a killed owner leaves: its lock, not locked
    with owner.claim(out, "embed", command="test") as c:
        assert c.stale["pid"] == holder.pid
    cluster_run(out, 2, report=False)


def test_a_lock_record_is_never_emptied_and_an_empty_one_does_not_orphan_the_folder(model, fashion, tmp_path):
    """CI (stop 22): a kill between truncating the lock file and rewriting it left it empty, and the next
    `cluster` refused the embedding folder as not ours. Records are now rewritten in place, never shorter;
    and a lock file without a record (as that kill left it) leaves the decision to the folder's own files."""
    root = images(tmp_path / "imgs", fashion, 8)
    out = tmp_path / "out"
    embed_folder(str(model), root, out, EmbedOptions(**OPTS))
    with owner.claim(out, "embed", command="a command with a long name " * 8):
        long = (out / owner.LOCK).stat().st_size
    with owner.claim(out, "embed", command="short") as c:
        assert c.previous["command"].startswith("a command with a long name")
        assert (out / owner.LOCK).stat().st_size >= long, "the record was rewritten shorter: a kill could empty it"
        assert owner.read_lock(out)["command"] == "short" and owner.read_lock(out)["state"] == "running"
    assert owner.read_lock(out)["state"] == "done"

    (out / owner.LOCK).write_bytes(b"")  # as the old truncate-then-write left it when killed in between
    cluster_run(out, 2, report=False)
    assert owner.read_lock(out)["kind"] == "embed" and (out / "cluster.set.json").is_file()
    (out / owner.LOCK).write_bytes(b"")
    with pytest.raises(OutputFolderError, match="not from a mixem-fast train run"):
        with owner.claim(out, "train", command="train", legacy=("checkpoints",)):
            pass  # an embedding folder is still not a train run's


def test_paths_are_resolved_so_any_working_directory_works(model, fashion, tmp_path, monkeypatch):
    """Finding 4: the model path was stored as typed; search elsewhere failed, resume with the absolute path was
    refused."""
    root = images(tmp_path / "imgs", fashion, 8)
    monkeypatch.chdir(model.parent)
    embed_folder(model.name, root, tmp_path / "out", EmbedOptions(**OPTS))
    assert manifest.load(tmp_path / "out").model == str(model.resolve())
    s = embed_folder(str(model.resolve()), root, tmp_path / "out", EmbedOptions(**OPTS))
    assert s["complete"] and s["shards_done_now"] == 0
    cluster_run(tmp_path / "out", 2, report=False)
    monkeypatch.chdir(tmp_path / "imgs")
    hits = search(tmp_path / "out", root / "c0/000.png", 3)  # from another working directory
    assert len(hits) == 3 and all(h["image_path"].startswith(f"{root.resolve()}/") for h in hits)
    # The same bytes elsewhere are the same model; other weights under the run's path are not.
    moved = tmp_path / "moved"
    shutil.copytree(model, moved)
    assert search(tmp_path / "out", root / "c0/000.png", 3, model=str(moved)) == hits
    torch.manual_seed(1)
    save_checkpoint(moved, MixEM(MixEMConfig(**CFG)), MixEMConfig(**CFG))
    with pytest.raises(DataError, match="not the model"):
        search(tmp_path / "out", root / "c0/000.png", 1, model=str(moved))


def test_a_changed_folder_is_said_and_update_embeds_only_the_changes(model, fashion, tmp_path):
    """Finding 5: new files were silently ignored (the old listing reused) and the run said "complete"."""
    root = images(tmp_path / "imgs", fashion, 10)
    out = tmp_path / "out"
    embed_folder(str(model), root, out, EmbedOptions(**OPTS))
    cluster_run(out, 2, report=False)
    images(root, fashion, 3, start=50)
    (root / "c1/001.png").unlink()
    with pytest.raises(ConfigError, match=r"changed since .* \(3 added, 1 removed files.*--update"):
        embed_folder(str(model), root, out, EmbedOptions(**OPTS))
    s = embed_folder(str(model), root, out, EmbedOptions(**OPTS, update=True))
    # 10 old ids in shards 0-2 (the last one partial), 3 new ids 10-12: shard 0 (the removed file), 2 and 3.
    assert s["complete"] and s["shards_done_now"] == 3 and s["embedded"] == 12 and s["files"] == 13
    by_path = {r["image_path"].rsplit("/", 2)[-2] + "/" + r["image_path"].rsplit("/", 1)[-1]: r for r in rows(out)}
    assert by_path["c1/001.png"]["status"] == "removed" and by_path["c0/050.png"]["id"] == 10
    with pytest.raises(DataError, match="made from other data"):
        search(out, root / "c0/000.png", 1)  # the clusters predate the update
    again = embed_folder(str(model), root, out, EmbedOptions(**OPTS))
    assert again["shards_done_now"] == 0 and again["complete"]


def test_links_out_of_the_root_are_not_followed_unless_asked(model, fashion, tmp_path):
    """Finding 8: links to files outside the image root went into the embeddings and the report, and a
    files.parquet row could point outside the root."""
    root = images(tmp_path / "imgs", fashion, 6)
    secret = images(tmp_path / "secret", fashion, 2, start=40)
    os.symlink(secret / "c0/040.png", root / "c0/link_out.png")
    os.symlink(secret / "c1", root / "dir_out")
    os.symlink(root / "c0/000.png", root / "c1/link_in.png")
    out = tmp_path / "out"
    embed_folder(str(model), root, out, EmbedOptions(**OPTS))
    listed = pq.read_table(out / "files.parquet").column("path").to_pylist()
    assert "c1/link_in.png" in listed and not [p for p in listed if "out" in p] and len(listed) == 7
    s = embed_folder(str(model), root, tmp_path / "follow", EmbedOptions(**OPTS, follow_links=True))
    assert s["files"] == 9
    # A listing edited to leave the root: readers refuse it (it no longer matches the manifest), and its rows
    # are refused wherever they are read.
    table = pq.read_table(out / "files.parquet")
    paths = table.column("path").to_pylist()
    paths[0] = "../secret/c0/040.png"
    pq.write_table(table.set_column(1, "path", pa.array(paths)), out / "files.parquet", row_group_size=4)
    with pytest.raises(DataError, match="does not match manifest.json"):
        cluster_run(out, 2, report=False)
    with pytest.raises(DataError, match="not inside the image folder"):
        manifest.load(out, strict=False).shard_rows(out, 0)


def test_a_file_swapped_for_a_link_after_listing_is_not_read(model, fashion, tmp_path):
    """Finding 8: the check at decode time, for a link that appears between the listing and the decode."""
    from mixem.embed_decode import decode_into

    root = images(tmp_path / "imgs", fashion, 2)
    secret = images(tmp_path / "secret", fashion, 1, start=40)
    os.symlink(secret / "c0/040.png", root / "c0/swapped.png")
    buf = np.ones((2, 1, 28, 28), np.uint8)
    got = decode_into([str(root / "c0/000.png"), str(root / "c0/swapped.png")], buf, 28, "L", str(root.resolve()))
    assert got[0] == (shards.OK, None) and got[1][0] == "outside_root" and not buf[1].any() and buf[0].any()


def test_bad_files_list_has_one_line_per_file(model, fashion, tmp_path):
    """Finding 9: bad_files.txt broke on names with a newline."""
    root = images(tmp_path / "imgs", fashion, 4)
    (root / "c0/two\nlines.png").write_bytes(b"not a png")
    (root / "c0/tab\there.png").write_bytes(b"not a png")
    s = embed_folder(str(model), root, tmp_path / "out", EmbedOptions(**OPTS))
    lines = (tmp_path / "out" / "bad_files.txt").read_text().splitlines()
    assert s["skipped"] == 2 and len(lines) == 2
    assert sorted(ln.split("\t")[0].rsplit("/", 1)[1] for ln in lines) == ["tab\\there.png", "two\\nlines.png"]
    jl = [json.loads(ln)["path"] for ln in (tmp_path / "out" / "bad_files.jsonl").read_text().splitlines()]
    assert sorted(p.rsplit("/", 1)[1] for p in jl) == ["tab\there.png", "two\nlines.png"]


def test_a_name_that_is_not_utf8_is_left_out_not_fatal(model, fashion, tmp_path):
    """Noticed on the way: one file name that is not UTF-8 made the whole run fail (parquet holds UTF-8 only)."""
    root = images(tmp_path / "imgs", fashion, 4)
    with open(os.fsencode(root / "c0") + b"/caf\xe9.png", "wb") as f:
        f.write((root / "c0/000.png").read_bytes())
    s = embed_folder(str(model), root, tmp_path / "out", EmbedOptions(**OPTS))
    assert s["complete"] and s["files"] == 4
