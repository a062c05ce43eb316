"""embed: every file accounted for, shards read back unchanged, kill -9 resume and two ranks equal one run."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from cli_runs import kill_after_first_shard
from dataset_writers import write_png
from PIL import Image

from mixem import manifest, shards
from mixem.checkpoint import save_checkpoint
from mixem.config import MixEMConfig
from mixem.embed import EmbedOptions, embed_folder
from mixem.embed_decode import decode_nvjpeg
from mixem.engines import load_engine
from mixem.errors import ConfigError
from mixem.folders import decode
from mixem.model import MixEM

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # big.png, on purpose


def make_model(path: Path, channels: int = 3) -> Path:
    cfg = MixEMConfig(
        backbone="convnet",
        width=8,
        image_size=28,
        in_channels=channels,
        head_hidden=16,
        mean=(0.29,) * channels,
        std=(0.35,) * channels,
    )
    torch.manual_seed(0)
    save_checkpoint(path, MixEM(cfg), cfg)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model") / "ckpt")


def _png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header claims width x height: what a decompression bomb looks like to PIL."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(raw[24:29])
    raw[16:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(raw)


@pytest.fixture(scope="module")
def messy(tmp_path_factory, fashion, tiles):
    """Real images in every mode PIL meets, plus every kind of bad or not-an-image file; (root, good, bad)."""
    root = tmp_path_factory.mktemp("messy") / "imgs"
    good = []
    for k in range(7):
        write_png(root / f"coat/{k:02d}.png", fashion[0][k])
        good.append(f"coat/{k:02d}.png")
    photo = tiles(8, 64)
    kinds = {
        "photo/rgb.jpg": lambda p: Image.fromarray(photo[0]).save(p, quality=90),
        "photo/UPPER.JPEG": lambda p: Image.fromarray(photo[1]).save(p, "JPEG"),
        "photo/cmyk.jpg": lambda p: Image.fromarray(photo[2]).convert("CMYK").save(p, "JPEG"),
        "photo/gray.jpg": lambda p: Image.fromarray(photo[3]).convert("L").save(p),
        "photo/alpha.png": lambda p: Image.fromarray(photo[4]).convert("RGBA").save(p),
        "photo/la.png": lambda p: Image.fromarray(photo[4]).convert("LA").save(p),
        "photo/palette.png": lambda p: Image.fromarray(photo[5]).convert("P").save(p, transparency=0),
        "photo/deep16.png": lambda p: Image.fromarray(photo[6][..., 0].astype(np.uint16) * 257).save(p),
        "photo/deep/rotated.jpg": lambda p: Image.fromarray(photo[7][:, :40]).save(p, exif=_exif(6)),
        "photo/x.bmp": lambda p: Image.fromarray(photo[0]).save(p),
        "photo/x.gif": lambda p: Image.fromarray(photo[1]).save(p),
        "photo/x.tif": lambda p: Image.fromarray(photo[2]).save(p),
    }
    for rel, save in kinds.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        save(root / rel)
        good.append(rel)
    jpeg = (root / "photo/rgb.jpg").read_bytes()
    png = (root / "coat/00.png").read_bytes()
    bad = {
        "bad/corrupt.jpg": ("corrupt", jpeg[:2] + b"\x00" * 300 + jpeg[302:]),
        "bad/truncated.png": ("corrupt", png[: len(png) // 2]),
        "bad/empty.jpg": ("corrupt", b""),
        "bad/text.jpg": ("corrupt", b"not a jpeg\n"),
        "bad/bomb.png": ("too_large", _png_claiming(20_000, 20_000)),  # PIL refuses it at open
        "bad/big.png": ("too_large", _png_claiming(10_000, 10_000)),  # PIL only warns; the limit refuses it
    }
    for rel, (_, content) in bad.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    os.symlink(root / "no/such/file.png", root / "bad/dangling.png")
    bad_status = {rel: st for rel, (st, _) in bad.items()} | {"bad/dangling.png": "unreadable"}
    # Never listed: hidden and AppleDouble files, a folder named like an image, a loop, non-images.
    (root / "coat/.hidden.png").write_bytes(png)
    (root / "coat/._00.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX/._rgb.jpg").write_bytes(b"\x00\x05\x16\x07")
    (root / "photo/folder.jpg").mkdir()
    (root / "photo/notes.txt").write_text("not an image")
    os.symlink(root, root / "coat/loop")
    return root, sorted(good), bad_status


def _exif(orientation: int) -> Image.Exif:
    e = Image.Exif()
    e[0x0112] = orientation
    return e


@pytest.fixture(scope="module")
def messy_run(messy, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "messy"
    summary = embed_folder(str(model), messy[0], out, EmbedOptions(batch_size=4, shard_size=8, workers=2))
    return out, summary


def test_every_file_accounted_for(messy, messy_run, model):
    root, good, bad = messy
    out, summary = messy_run
    m = manifest.load(out)
    rel = pq.read_table(out / manifest.FILES).column("path").to_pylist()
    assert rel == sorted(good + list(bad)) and m.n_files == len(rel)
    rows = [r for s in range(m.n_shards) for r in shards.read_shard(out, s)[1].to_pylist()]
    assert [r["id"] for r in rows] == list(range(len(rel)))
    by_path = {r["image_path"][len(str(root)) + 1 :]: r for r in rows}
    assert len(by_path) == len(rows)  # each file exactly once
    assert {p for p, r in by_path.items() if r["status"] == "ok"} == set(good)
    assert {p: r["status"] for p, r in by_path.items() if r["status"] != "ok"} == bad
    assert all(by_path[p]["error"] for p in bad) and all(by_path[p]["mixture_probs"] is None for p in bad)
    assert summary["complete"] and summary["embedded"] == len(good) and summary["skipped"] == len(bad)
    assert summary["skipped_by_status"] == {"corrupt": 4, "too_large": 2, "unreadable": 1}
    listed = [line.split("\t")[0] for line in (out / "bad_files.txt").read_text().splitlines()]
    assert sorted(listed) == sorted(f"{root}/{p}" for p in bad)
    jl = [json.loads(line) for line in (out / "bad_files.jsonl").read_text().splitlines()]
    assert {j["path"]: j["status"] for j in jl} == {f"{root}/{p}": s for p, s in bad.items()}
    # Stats last, and no temporary file left behind.
    assert sorted(p.name for p in (out / "stats").iterdir()) == [f"{s:05d}.json" for s in range(m.n_shards)]
    assert not [p for p in out.rglob(".*") if ".tmp" in p.name]


def test_vectors_are_the_engine_outputs_row_aligned(messy, messy_run, model):
    root, good, bad = messy
    out, _ = messy_run
    m = manifest.load(out)
    engine = load_engine(str(model), "torch", "cpu")
    for s in range(m.n_shards):
        vec, meta = shards.read_shard(out, s)
        assert vec.dtype == np.float16 and vec.shape[1] == 32
        for v, row in zip(vec, meta.to_pylist()):
            if row["status"] != "ok":
                assert not v.any()
                continue
            x = decode(row["image_path"], 28, "RGB")[None].copy()
            emb, probs = engine(x)
            np.testing.assert_allclose(v.astype(np.float32), emb[0].numpy(), atol=2e-3)
            np.testing.assert_allclose(row["mixture_probs"], probs[0].numpy(), atol=1e-4)
            assert row["mixture_argmax"] == int(np.argmax(row["mixture_probs"]))


def test_shards_read_back_with_pyarrow_numpy_and_embedding_reader(messy_run):
    out, _ = messy_run
    m = manifest.load(out)
    vec = np.concatenate([np.load(shards.emb_path(out, s)) for s in range(m.n_shards)])
    meta = [r for s in range(m.n_shards) for r in pq.read_table(shards.meta_path(out, s)).to_pylist()]
    assert len(vec) == len(meta) == m.n_files
    ok = np.array([r["status"] == "ok" for r in meta])
    np.testing.assert_allclose(np.linalg.norm(vec[ok].astype(np.float32), axis=1), 1.0, atol=2e-3)
    er = pytest.importorskip("embedding_reader", reason="embedding-reader not installed (pip install embedding-reader)")
    reader = er.EmbeddingReader(
        embeddings_folder=str(out / "embeddings"),
        metadata_folder=str(out / "metadata"),
        meta_columns=["image_path", "status"],
        file_format="parquet_npy",
    )
    assert reader.count == m.n_files
    got, paths = [], []
    for emb, df in reader(batch_size=5, start=0, end=reader.count, parallel_pieces=1, show_progress=False):
        got.append(emb)
        paths += df["image_path"].tolist()
    np.testing.assert_array_equal(np.concatenate(got), vec.astype(np.concatenate(got).dtype))
    assert paths == [r["image_path"] for r in meta]


def test_rerun_skips_finished_shards_and_refuses_other_settings(messy, messy_run, model):
    out, _ = messy_run
    again = embed_folder(str(model), messy[0], out, EmbedOptions(batch_size=4, shard_size=8, workers=2))
    assert again["shards_done_now"] == 0 and again["images_this_run"] == 0 and again["complete"]
    with pytest.raises(ConfigError, match="shard_size: 8 there, 5 now"):
        embed_folder(str(model), messy[0], out, EmbedOptions(batch_size=4, shard_size=5))


def test_backbone_features_are_stored_unit_norm(messy, model, tmp_path):
    s = embed_folder(str(model), messy[0] / "coat", tmp_path / "bb", EmbedOptions(features="backbone", shard_size=4))
    vec, _ = shards.read_shard(tmp_path / "bb", 0)
    assert s["dim"] == MixEM(MixEMConfig(backbone="convnet", width=8, image_size=28, head_hidden=16)).feature_dim
    np.testing.assert_allclose(np.linalg.norm(vec.astype(np.float32), axis=1), 1.0, atol=2e-3)


def test_rank_shards_cover_every_shard_once():
    for n, w in [(10, 3), (2, 4), (7, 1), (0, 2)]:
        got = sorted(s for r in range(w) for s in manifest.rank_shards(n, r, w))
        assert got == list(range(n))
    with pytest.raises(ConfigError):
        manifest.rank_shards(4, 2, 2)


# ---------------------------------------------------------------- processes: kill -9 resume, two ranks


@pytest.fixture(scope="module")
def plain(tmp_path_factory, fashion, model):
    """200 real PNGs in 50 shards of 4, and the output of one uninterrupted in-process run."""
    root = tmp_path_factory.mktemp("plain") / "imgs"
    for k in range(200):
        write_png(root / f"{k % 10}/{k:03d}.png", fashion[0][k])
    ref = tmp_path_factory.mktemp("ref") / "out"
    embed_folder(str(model), root, ref, EmbedOptions(batch_size=4, shard_size=4, workers=2))
    return root, ref


def _cli(model, root, out, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env_extra or {})}
    cmd = [
        sys.executable,
        "-m",
        "mixem.cli",
        "embed",
        str(model),
        str(root),
        "--out",
        str(out),
        "-b",
        "4",
        "--shard-size",
        "4",
        "--workers",
        "2",
        "-q",
    ]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def assert_same_output(a: Path, b: Path):
    m = manifest.load(a)
    assert manifest.load(b) == m
    for s in range(m.n_shards):
        np.testing.assert_array_equal(np.load(shards.emb_path(a, s)), np.load(shards.emb_path(b, s)))
        assert pq.read_table(shards.meta_path(a, s)).equals(pq.read_table(shards.meta_path(b, s)))
    for f in ("bad_files.txt", "files.parquet"):
        assert (a / f).read_bytes() == (b / f).read_bytes()


@pytest.mark.distributed
def test_kill_9_then_rerun_equals_an_uninterrupted_run(plain, model, tmp_path):
    root, ref = plain
    out = tmp_path / "out"
    proc = _cli(model, root, out)
    kill_after_first_shard(proc, out)
    n_done = len(shards.done_shards(out, manifest.load(out)))
    assert 1 <= n_done < 50  # killed mid-run, with finished shards to keep
    again = embed_folder(str(model), root, out, EmbedOptions(batch_size=4, shard_size=4, workers=2))
    assert again["shards_already_done"] == n_done and again["shards_done_now"] == 50 - n_done
    assert_same_output(ref, out)
    assert not [p for p in out.rglob(".*") if ".tmp" in p.name]


@pytest.mark.distributed
def test_two_ranks_equal_one_process(plain, model, tmp_path):
    root, ref = plain
    out = tmp_path / "out"
    procs = [_cli(model, root, out, {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)}) for r in (0, 1)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (_, e) in zip(procs, results):
        assert p.returncode == 0, e.decode()[-800:]
    per_rank = [json.loads(o) for o, _ in results]
    assert [s["shards_done_now"] for s in per_rank] == [25, 25]
    assert sum(s["images_this_run"] for s in per_rank) == 200  # nothing padded or duplicated
    assert_same_output(ref, out)


@pytest.mark.gpu
def test_nvjpeg_batch_falls_back_per_image(messy):
    root, good, bad = messy
    paths = [str(root / p) for p in ("photo/rgb.jpg", "bad/corrupt.jpg", "photo/cmyk.jpg", "coat/00.png")]
    x, status = decode_nvjpeg(paths, 28, 3, torch.device("cuda"))
    assert [s for s, _ in status] == ["ok", "corrupt", "ok", "ok"]
    ref = decode(paths[0], 28, "RGB")
    assert np.abs(x[0].cpu().numpy().astype(int) - ref).mean() < 8  # nvJPEG + torch resize vs PIL draft
    assert not x[1].any()
