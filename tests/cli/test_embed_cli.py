"""embed, cluster and search through Typer's CliRunner: the happy path on real images and one-line errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mixem.checkpoint import save_checkpoint
from mixem.cli.app import app
from mixem.config import MixEMConfig
from mixem.model import MixEM

runner = CliRunner()
DATA = Path(__file__).resolve().parents[2] / "mixem" / "data_files"


def _one_error_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_embed")
    raw = gzip.decompress((DATA / "t10k-images-idx3-ubyte.gz").read_bytes())
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:60]
    root = tmp / "imgs"
    for k, im in enumerate(images):
        (root / f"c{k % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(root / f"c{k % 3}/{k:02d}.jpg", quality=95)
    (root / "c0/broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    cfg = MixEMConfig(
        backbone="convnet", width=8, image_size=28, in_channels=1, head_hidden=16, mean=(0.29,), std=(0.35,)
    )
    torch.manual_seed(0)
    save_checkpoint(tmp / "ckpt", MixEM(cfg), cfg)
    return tmp, root


def test_embed_cluster_search(setup):
    tmp, root = setup
    out = tmp / "out"
    r = runner.invoke(
        app,
        [
            "embed",
            str(tmp / "ckpt"),
            str(root),
            "--out",
            str(out),
            "--shard-size",
            "16",
            "-b",
            "8",
            "--quiet",
            "--json-log",
            str(tmp / "log.jsonl"),
        ],
    )
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["complete"] and s["embedded"] == 60 and s["skipped"] == 1 and s["shards_total"] == 4
    events = [json.loads(line)["event"] for line in (tmp / "log.jsonl").read_text().splitlines()]
    assert events[0] == "embed_start" and events.count("shard") == 4 and events[-1] == "embed_end"
    r = runner.invoke(app, ["cluster", str(out), "--k", "3", "--init", "kmeans++", "--spherical", "--quiet"])
    assert r.exit_code == 0, r.output
    c = json.loads(r.output)
    assert c["points"] == 60 and c["labels"] == "sub-folder names" and len(c["outputs"]) == 6  # + duplicates
    r = runner.invoke(app, ["search", str(out), str(root / "c1/01.jpg"), "-k", "3"])
    assert r.exit_code == 0, r.output
    hits = [json.loads(line) for line in r.output.splitlines()]
    assert [h["rank"] for h in hits] == [1, 2, 3] and all(h["image_path"].startswith(str(root)) for h in hits)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["embed", "{tmp}/nope", "{root}", "--out", "{tmp}/o1"], "nope"),
        (["embed", "{tmp}/ckpt", "{tmp}/no_images", "--out", "{tmp}/o2"], "no_images"),
        (["embed", "{tmp}/ckpt", "{root}", "--out", "{tmp}/o3", "--engine", "onnx"], "mixem-fast export"),
        (["embed", "{tmp}/ckpt", "{root}", "--out", "{tmp}/o4", "--decoder", "nvjpeg"], "--decoder"),
        (["cluster", "{tmp}/not_a_run", "--k", "3"], "mixem-fast embed"),
        (["search", "{tmp}/not_a_run", "{root}/c0/00.jpg"], "mixem-fast embed"),
        (["classify", "{tmp}/nope", "{root}", "--out", "{tmp}/o5"], "nope"),
        (["cluster", "{tmp}/not_a_run"], "--k K (or --k auto), or --centroids"),
        (["cluster", "{tmp}/not_a_run", "--k", "many"], "--k must be a number of clusters or 'auto'"),
        (["cluster", "{tmp}/not_a_run", "--k", "auto", "--k-range", "5"], "--k-range '5'"),
    ],
)
def test_bad_input_is_one_line(setup, args, needle):
    tmp, root = setup
    r = runner.invoke(app, [a.format(tmp=tmp, root=root) for a in args])
    assert needle in _one_error_line(r)


def test_cluster_k_too_large_and_search_bad_query(setup):
    tmp, root = setup
    out = tmp / "out2"
    assert runner.invoke(app, ["embed", str(tmp / "ckpt"), str(root), "--out", str(out), "-q"]).exit_code == 0
    assert "--k must be between 1 and the 60" in _one_error_line(runner.invoke(app, ["cluster", str(out), "--k", "61"]))
    assert runner.invoke(app, ["cluster", str(out), "--k", "2", "-q", "--no-report"]).exit_code == 0
    r = runner.invoke(app, ["search", str(out), str(root / "c0/broken.jpg")])
    assert "cannot read this image" in _one_error_line(r)


def test_classify_cluster_auto_and_given_centroids(setup):
    """classify writes one class per readable file; --k auto picks a k of its range and says how; --centroids
    assigns a second batch to the first batch's clusters."""
    tmp, root = setup
    out = tmp / "classified"
    r = runner.invoke(app, ["classify", str(tmp / "ckpt"), str(root), "--out", str(out), "--shard-size", "16", "-q"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["complete"] and s["classified"] == 60 and s["skipped"] == 1
    assert "no classes.json" in s["classes_from"]  # an untrained checkpoint: the argmax of its head
    r = runner.invoke(app, ["cluster", str(out), "--k", "auto", "--k-range", "2:5", "-q", "--no-report"])
    assert r.exit_code == 0, r.output
    first = json.loads((out / "metrics.json").read_text())
    assert first["k_scan"]["best"] == json.loads(r.output)["k"] and 2 <= first["k"] <= 5
    assert [row["k"] for row in first["k_scan"]["rows"]] == [2, 3, 4, 5]
    again = tmp / "again"
    assert runner.invoke(app, ["embed", str(tmp / "ckpt"), str(root / "c1"), "--out", str(again), "-q"]).exit_code == 0
    r = runner.invoke(app, ["cluster", str(again), "--centroids", str(out / "centroids.npy"), "-q", "--no-report"])
    assert r.exit_code == 0, r.output
    import pyarrow.parquet as pq

    before = dict(zip(*pq.read_table(out / "clusters.parquet", columns=["image_path", "cluster"]).to_pydict().values()))
    after = dict(
        zip(*pq.read_table(again / "clusters.parquet", columns=["image_path", "cluster"]).to_pydict().values())
    )
    assert len(after) == 20 and all(before[p] == c for p, c in after.items())  # the same images, the same clusters
    wrong = tmp / "wrong.npy"
    np.save(wrong, np.zeros((3, 5), np.float32))
    assert "not (k, 32) floats" in _one_error_line(
        runner.invoke(app, ["cluster", str(again), "--centroids", str(wrong)])
    )
