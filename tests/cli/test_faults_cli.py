"""Bad input and environment faults through the CLI (issue 15): one line, exit 1, never a traceback without --debug."""

from __future__ import annotations

import errno
import gzip
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mixem.checkpoint import save_checkpoint
from mixem.cli.app import app
from mixem.config import MixEMConfig
from mixem.errors import MixEMError
from mixem.model import MixEM

runner = CliRunner()
DATA = Path(__file__).resolve().parents[2] / "mixem" / "data_files"
CFG = dict(backbone="convnet", width=8, image_size=28, in_channels=1, head_hidden=16, mean=(0.29,), std=(0.35,))


def one_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(tmp, image folder, checkpoint, a clustered embedding folder): 24 real images, 3 shards, k = 3."""
    tmp = tmp_path_factory.mktemp("faults")
    raw = gzip.decompress((DATA / "t10k-images-idx3-ubyte.gz").read_bytes())
    for k, im in enumerate(np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:24]):
        (tmp / f"imgs/c{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(tmp / f"imgs/c{k % 2}/{k:02d}.png")
    torch.manual_seed(0)
    save_checkpoint(tmp / "ckpt", MixEM(MixEMConfig(**CFG)), MixEMConfig(**CFG))
    out = tmp / "out"
    assert (
        runner.invoke(
            app, ["embed", str(tmp / "ckpt"), str(tmp / "imgs"), "-o", str(out), "--shard-size", "8", "-q"]
        ).exit_code
        == 0
    )
    assert runner.invoke(app, ["cluster", str(out), "--k", "3", "-q", "--no-report"]).exit_code == 0
    return tmp, tmp / "imgs", tmp / "ckpt", out


def copy_of(path: Path, to: Path) -> Path:
    shutil.copytree(path, to, symlinks=True)
    return to


def test_out_that_is_a_file_is_one_line(run, tmp_path):
    """Finding 6: --out that is a file gave a traceback (train, export, embed)."""
    tmp, imgs, ckpt, _ = run
    f = tmp_path / "a_file"
    f.write_text("mine")
    for args in (
        ["embed", str(ckpt), str(imgs), "--out", str(f)],
        ["export", str(ckpt), "--out", str(f)],
        ["train", "--max-images", "64", "--batch-size", "32", "--epochs", "1", "--out", str(f), "--no-eval"],
        ["embed", str(ckpt), str(imgs), "--out", str(f / "below")],
    ):
        assert str(f) in one_line(runner.invoke(app, args)) and f.read_text() == "mine"


def test_bad_values_and_files_are_one_line(run, tmp_path):
    """Findings 6, 7, 9: --lr -1, a --labels file that is not UTF-8, eval --k 0, and config.json values that
    must not be trusted (refused before anything is written)."""
    tmp, imgs, ckpt, out = run
    assert "lr must be a finite number > 0" in one_line(runner.invoke(app, ["train", "--lr", "-1"]))
    labels = tmp_path / "labels.csv"
    labels.write_bytes("path,label\nc0/00.png,caf\xe9\n".encode("latin-1"))
    line = one_line(
        runner.invoke(app, ["cluster", str(copy_of(out, tmp_path / "o")), "--k", "2", "--labels", str(labels)])
    )
    assert "not UTF-8" in line and str(labels) in line
    assert "--k must be >= 1" in one_line(runner.invoke(app, ["eval", str(ckpt), str(imgs), "--k", "0"]))
    for field, value, needle in [
        ("components", 10.0, "components must be an integer"),
        ("image_size", 100000, "image_size must be"),
        ("std", [0.0], "std finite and > 0"),
        ("mean", [float("nan")], "mean must be finite"),
    ]:
        bad = copy_of(ckpt, tmp_path / f"ckpt_{field}")
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**cfg, field: value}))
        line = one_line(runner.invoke(app, ["embed", str(bad), str(imgs), "--out", str(tmp_path / f"o_{field}")]))
        assert needle in line and "config.json" in line and not (tmp_path / f"o_{field}").exists()


def test_nan_outputs_of_the_engine_are_refused_not_stored(run, tmp_path):
    """Finding 7: NaN embeddings were stored with status ok."""
    tmp, imgs, _, _ = run
    model = MixEM(MixEMConfig(**CFG))
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    save_checkpoint(tmp_path / "nan", model, MixEMConfig(**CFG))
    out = tmp_path / "o"
    line = one_line(runner.invoke(app, ["embed", str(tmp_path / "nan"), str(imgs), "--out", str(out)]))
    assert "NaN or infinite outputs" in line and not list((out / "stats").glob("*.json"))


def test_train_refused_by_its_checks_leaves_no_folder(tmp_path):
    """Finding 9: a train refused by its checks left an empty --out behind."""
    out = tmp_path / "run"
    line = one_line(runner.invoke(app, ["train", "--max-images", "10", "--batch-size", "64", "--out", str(out)]))
    assert "--batch-size 64" in line and not out.exists()


def _damage(out: Path, what: str):
    if what == "npy shard":
        p = out / "embeddings/img_emb_00001.npy"
        p.write_bytes(p.read_bytes()[:-7])
    elif what == "npy header":
        p = out / "embeddings/img_emb_00001.npy"
        p.write_bytes(b"garbage!" * (p.stat().st_size // 8) + b"x" * (p.stat().st_size % 8))
    elif what == "metadata parquet":
        p = out / "metadata/metadata_00002.parquet"
        p.write_bytes(b"\0" * p.stat().st_size)
    elif what == "stats":
        (out / "stats/00000.json").write_text("{not json")
    elif what == "manifest":
        (out / "manifest.json").write_text('{"version": 2, "n_files": "many"}')
    elif what == "files.parquet":
        (out / "files.parquet").write_bytes(b"PAR1 nothing")
    elif what == "index":
        p = out / "index.faiss"
        p.write_bytes(b"\1" * p.stat().st_size)
    elif what == "clusters.parquet":
        (out / "clusters.parquet").write_bytes(b"short")


@pytest.mark.parametrize(
    "what, command, needle",
    [
        ("npy shard", "cluster", "shard 00001: its npy or parquet file was changed"),
        ("npy header", "cluster", "shard 00001: its npy or parquet file is damaged"),
        ("metadata parquet", "cluster", "shard 00002: its npy or parquet file is damaged"),
        ("stats", "cluster", "shard 00000: its stats are unreadable"),
        ("manifest", "cluster", "manifest.json: not a mixem-fast embedding manifest"),
        ("manifest", "search", "manifest.json: not a mixem-fast embedding manifest"),
        ("files.parquet", "cluster", "files.parquet: does not match manifest.json"),
        ("index", "search", "index.faiss: not a readable faiss index"),
        ("clusters.parquet", "search", "clusters.parquet: was changed since it was written"),
    ],
)
def test_damaged_artefacts_are_one_line_naming_the_file(run, tmp_path, what, command, needle):
    """Finding 6: damaged or hand-edited artefacts of every kind read back gave tracebacks (or were used)."""
    _, imgs, _, out = run
    out = copy_of(out, tmp_path / "o")
    _damage(out, what)
    args = ["cluster", str(out), "--k", "2"] if command == "cluster" else ["search", str(out), str(imgs / "c0/00.png")]
    assert needle in one_line(runner.invoke(app, args))


def test_damaged_checkpoint_files_are_one_line(run, tmp_path):
    tmp, imgs, ckpt, _ = run
    r = runner.invoke(
        app,
        [
            "train",
            "--max-images",
            "64",
            "--batch-size",
            "32",
            "--epochs",
            "2",
            "--out",
            str(tmp_path / "r"),
            "--no-eval",
            "-q",
            "--preset",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    (tmp_path / "r/checkpoints/latest").write_text("../../../etc\n")
    assert "not a checkpoint" in one_line(runner.invoke(app, ["eval", str(tmp_path / "r"), str(imgs)]))
    (tmp_path / "r/checkpoints/latest").write_text("epoch_0002\n")
    (tmp_path / "r/checkpoints/epoch_0002/state.json").write_text("[1, 2")
    line = one_line(runner.invoke(app, ["train", "--resume", "--out", str(tmp_path / "r"), "--epochs", "3"]))
    assert "state.json: not valid JSON" in line


def test_debug_shows_the_traceback(run, tmp_path):
    _, _, _, out = run
    out = copy_of(out, tmp_path / "o")
    _damage(out, "stats")
    r = runner.invoke(app, ["--debug", "cluster", str(out), "--k", "2"])
    assert isinstance(r.exception, MixEMError)  # raised through: the traceback is shown
    r = runner.invoke(app, ["cluster", str(out), "--k", "2", "--debug"])
    assert isinstance(r.exception, MixEMError)
    assert "stats are unreadable" in one_line(runner.invoke(app, ["cluster", str(out), "--k", "2"]))


def test_disk_full_while_clustering_keeps_the_previous_set(run, tmp_path, monkeypatch):
    """Finding 6 (and 3): a full disk gave a 58-line traceback and left a partial cluster set. Here the index
    writer fails with ENOSPC as it would on a full disk (the real full disk: test_real_full_and_read_only_disk)."""
    import faiss

    import mixem.clustering

    _, _, _, out = run
    out = copy_of(out, tmp_path / "o")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".mixem.lock"}

    def full(index, path):
        Path(path).write_bytes(b"part of an index")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mixem.clustering.faiss, "write_index", full)
    line = one_line(runner.invoke(app, ["cluster", str(out), "--k", "2", "--report"]))
    assert "index.faiss: no space left on the device" in line
    monkeypatch.setattr(mixem.clustering.faiss, "write_index", faiss.write_index)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".mixem.lock"}
    assert after == before  # the k = 3 set, whole; no report of k = 2, no temporary left


FAULTS = r"""
import json, os, shutil, subprocess, sys
from typer.testing import CliRunner
from mixem.cli.app import app

run, ckpt, imgs, mnt = (sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4])
r = CliRunner()
res = {}
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mnt], check=True)
out = shutil.copytree(run, mnt + "/out")
fd = os.open(mnt + "/filler", os.O_WRONLY | os.O_CREAT)
try:  # fill the disk to the last byte
    while True:
        os.write(fd, b"\0" * 4096)
except OSError:
    os.close(fd)
x = r.invoke(app, ["cluster", out, "--k", "2"])
res["full"] = [x.exit_code, x.stderr, sorted(os.listdir(out)), json.load(open(out + "/metrics.json"))["k"]]
ro = mnt + "/ro"  # a second small tmpfs, holding a copy of the run, made read-only
os.mkdir(ro)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", ro], check=True)
os.remove(mnt + "/filler")
out = shutil.copytree(run, ro + "/out")
subprocess.run(["mount", "-o", "remount,ro", ro], check=True)
for name, args in {
    "embed": ["embed", ckpt, imgs, "--out", ro + "/new"],
    "cluster": ["cluster", out, "--k", "2"],
    "export": ["export", ckpt, "--out", ro + "/exp"],
    "train": ["train", "--max-images", "64", "--batch-size", "32", "--out", ro + "/run", "--no-eval"],
}.items():
    x = r.invoke(app, args)
    res[name] = [x.exit_code, x.stderr]
print(json.dumps(res))
"""


def test_real_full_and_read_only_disk(run, tmp_path):
    """Finding 6 on a real small tmpfs (in a user and mount namespace: no root needed where they are allowed)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no unprivileged mount namespace here (unshare -rm) to mount a small tmpfs")
    _, imgs, ckpt, out = run
    (tmp_path / "mnt").mkdir()
    cmd = ["unshare", "-rm", sys.executable, "-c", textwrap.dedent(FAULTS), str(out), str(ckpt), str(imgs)]
    p = subprocess.run([*cmd, str(tmp_path / "mnt")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    code, err, names, k = res.pop("full")
    assert code == 1 and err.count("\n") == 1 and "no space left on the device" in err, err
    assert k == 3 and "cluster.set.json" in names and not [n for n in names if ".tmp" in n]
    for name, (code, err) in res.items():
        assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, (name, err)
        assert "read-only file system" in err, (name, err)
