"""classify: embed's folder handling (every good file once, bad ones listed, kill -9 resume) plus each file's class,
probability and distance, equal to what mixem.load(...).predict says for the same file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from cli_runs import kill_after_first_shard
from test_embed import REPO, assert_same_output, make_model, messy  # noqa: F401 (messy: real, odd and broken files)

import mixem
from mixem import classes, manifest, shards
from mixem.classification import classify_folder, read_classified
from mixem.embed import EmbedOptions
from mixem.errors import ConfigError, DataError
from mixem.files import sha256_file
from mixem.kmeans import kmeans

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # big.png, on purpose
OPTS = dict(batch_size=4, shard_size=8, workers=2)


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_run, tiles, fashion):
    """A copy of a small trained run's checkpoint whose classes.json holds k-means centroids of its embeddings of
    real images (classes by centroids: the case where distances decide)."""
    path = tmp_path_factory.mktemp("model") / "ckpt"
    shutil.copytree(tiny_run.checkpoint, path)
    m = mixem.load(path)
    emb = m.embed(list(tiles(40, 64)) + list(fashion[0][:200]))
    res = kmeans(emb, 4, init="kmeans++", nredo=3, seed=0)
    found = classes.Classes("centroids", 4, res.centroids, ["a", "b", "c", "d"], float(res.distances.mean()))
    found.info = {"checkpoint_sha256": sha256_file(path / "model.safetensors")}
    classes.save(path, found)
    return path


@pytest.fixture(scope="module")
def classified(messy, model, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("runs") / "classified"
    return out, classify_folder(str(model), messy[0], out, EmbedOptions(**OPTS))


def test_each_good_file_once_bad_ones_listed(messy, classified):  # noqa: F811
    root, good, bad = messy
    out, summary = classified
    table = read_classified(out)
    paths = [p[len(str(root)) + 1 :] for p in table.column("image_path").to_pylist()]
    assert sorted(paths) == sorted(good) and len(set(paths)) == len(paths)
    listed = [line.split("\t")[0] for line in (out / "bad_files.txt").read_text().splitlines()]
    assert sorted(listed) == sorted(f"{root}/{p}" for p in bad)
    assert summary["classified"] == len(good) and summary["skipped"] == len(bad) and summary["complete"]
    assert summary["classes_from"].endswith("classes.json") and sum(summary["class_sizes"].values()) == len(good)
    assert table.column_names == ["image_path", "id", "class", "class_name", "probability", "distance"]
    assert not [p for p in out.rglob(".*") if ".tmp" in p.name]


def test_classes_are_what_predict_says(messy, classified, model):  # noqa: F811
    root, good, _ = messy
    out, _ = classified
    t = pq.read_table(out / "classes.parquet").to_pydict()
    m = mixem.load(model)
    pred = m.predict(t["image_path"])  # the same files, decoded as embed decodes them
    # The shards hold float16 vectors: an image whose two nearest centres are closer than that rounding may go
    # either way; every other image gets predict's class, name, distance and probability.
    d2 = np.sort(classes.sq_to_centres(m.embed(t["image_path"]), m.classes.centroids), axis=1)
    clear = d2[:, 1] - d2[:, 0] > 1e-2
    assert clear.sum() >= len(clear) - 2
    np.testing.assert_array_equal(np.array(t["class"])[clear], pred.classes[clear])
    assert [n for n, c in zip(t["class_name"], clear) if c] == [n for n, c in zip(pred.names, clear) if c]
    np.testing.assert_allclose(np.array(t["distance"])[clear], pred.distance[clear], atol=5e-3)
    np.testing.assert_allclose(np.array(t["probability"])[clear], pred.probability[clear], atol=5e-3)


def test_kill_9_then_rerun_equals_an_uninterrupted_run(messy, model, classified, tmp_path):  # noqa: F811
    root = messy[0]
    ref, _ = classified
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mixem.cli", "classify", str(model), str(root), "--out", str(out), "-b", "4",
           "--shard-size", "8", "--workers", "2", "-q"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kill_after_first_shard(proc, out)
    m = manifest.load(out)
    assert 1 <= len(shards.done_shards(out, m)) < m.n_shards and not (out / "classes.parquet").exists()
    again = classify_folder(str(model), root, out, EmbedOptions(**OPTS))
    assert again["complete"] and again["shards_already_done"] >= 1
    assert_same_output(ref, out)  # shards, listing and bad files
    assert read_classified(out).equals(read_classified(ref))
    assert not [p for p in out.rglob(".*") if ".tmp" in p.name]


def test_without_classes_the_head_decides_and_bad_options_are_one_line(messy, tmp_path):  # noqa: F811
    plain = make_model(tmp_path / "plain")
    out = tmp_path / "out"
    s = classify_folder(str(plain), messy[0] / "coat", out, EmbedOptions(**OPTS))
    t = pq.read_table(out / "classes.parquet")
    probs = np.stack(pq.read_table(shards.meta_path(out, 0)).column("mixture_probs").to_pylist())
    np.testing.assert_array_equal(t.column("class").to_numpy(), probs.argmax(1))
    assert "no classes.json" in s["classes_from"] and np.isnan(t.column("distance").to_numpy()).all()
    with pytest.raises(ConfigError, match="drop --features backbone"):
        classify_folder(str(plain), messy[0], tmp_path / "o2", EmbedOptions(features="backbone"))
    (plain / "classes.json").write_text('{"by": "head", "k": 0}')
    with pytest.raises(DataError, match="classes.json: 'by' 'head', k 0"):
        classify_folder(str(plain), messy[0], tmp_path / "o3", EmbedOptions(**OPTS))


@pytest.mark.distributed
def test_two_ranks_equal_one_process(model, fashion, tmp_path):
    """Under torchrun each rank embeds its own shards; rank 0 waits for the others, then writes the classes."""
    from dataset_writers import write_png

    root = tmp_path / "imgs"
    for k in range(40):
        write_png(root / f"{k % 4}/{k:03d}.png", fashion[0][k])
    ref = tmp_path / "ref"
    classify_folder(str(model), root, ref, EmbedOptions(batch_size=4, shard_size=4, workers=1))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mixem.cli", "classify", str(model), str(root), "--out", str(out), "-b", "4",
           "--shard-size", "4", "--workers", "1", "-q"]  # fmt: skip
    procs = [
        subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)})
        for r in (0, 1)
    ]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-800:]
    assert_same_output(ref, out)
    assert read_classified(out).equals(read_classified(ref))
