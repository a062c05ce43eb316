"""Fault injection (issue 15): kill -9 embed, cluster, export and train at random points, run them again, and
check that the second run ends as an uninterrupted one and that no output set on disk ever mixes two runs.

Each command runs in a real process, killed with SIGKILL after a random delay drawn (per seed) from [0, the
uninterrupted run's duration]. The processes are forked from a forkserver that imported torch, faiss, onnx
and mixem once, so a run costs its work and not the ~3 s of imports; time only picks the kill point, no
assertion depends on it.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mixem import manifest, outputs, shards
from mixem.errors import DataError

pytestmark = pytest.mark.distributed
SEEDS = (0, 1, 2)
EXPORT_SEEDS = SEEDS[:2]  # an export is ~3-5 s of torch.onnx tracing alone: two kill points keep the suite fast
DATA = Path(__file__).resolve().parents[1] / "mixem" / "data_files"
TINY = {
    "model": dict(backbone="convnet", width=8, image_size=28, in_channels=1, head_hidden=16, mean=[0.29], std=[0.35]),
    # Every stage a kill can land in: the representation (3 epochs), neighbours (2), self-labelling (1).
    "train": dict(batch_size=32, epochs=3, optimizer="adamw", lr=2e-3, warmup_epochs=0.5, blur=False)
    | dict(refine_epochs=2, selflabel_epochs=1, refine_neighbors=5),
}
PRELOAD = ["torch", "torchvision", "faiss", "pyarrow.parquet", "onnx", "onnxruntime", "onnxscript", "sklearn.metrics"]
PRELOAD += ["mixem.cli.app", "mixem.embed", "mixem.clustering", "mixem.search", "mixem.export", "mixem.session"]
PRELOAD += ["mixem.classification", "mixem.report", "matplotlib.figure"]


def _cli(args: list[str], log: str):
    """A child: `mixem-fast ARGS`, its output to the file `log`; its exit status is the command's."""
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(out, 2)
    from mixem.cli.app import app

    try:
        app(args=args, prog_name="mixem-fast")
    except SystemExit as e:
        os._exit(e.code if isinstance(e.code, int) else 1)
    os._exit(0)


@pytest.fixture(scope="module")
def fork(tmp_path_factory):
    """start(args) -> a running child process of `mixem-fast ARGS`, forked from a preloaded forkserver."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    os.environ.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")  # the server's environment, for every child
    try:
        first = ctx.Process(target=_cli, args=(["--help"], os.devnull))  # starts the server with the preloads
        first.start()
        first.join(300)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)

    logs = tmp_path_factory.mktemp("fault_logs")

    def start(args: list[str]):
        log = logs / f"{len(list(logs.iterdir())):04d}.log"
        p = ctx.Process(target=_cli, args=([str(a) for a in args], str(log)))
        p.start()
        p.log = log  # what the command printed: shown when a run that must succeed fails
        return p

    yield start
    server = getattr(mp.forkserver, "_forkserver", None)
    if server is not None and hasattr(server, "_stop"):
        server._stop()  # the server this module started ends with it


def finish(start, args) -> float:
    """Run to the end; the wall time."""
    t = time.perf_counter()
    p = start(args)
    p.join(300)
    said = p.log.read_text(errors="replace")[-3000:] if p.log.exists() else ""
    assert p.exitcode == 0, f"mixem-fast {' '.join(map(str, args))} exited {p.exitcode}; it printed:\n{said}"
    return time.perf_counter() - t


def kill_at(start, args, delay: float):
    p = start(args)
    time.sleep(delay)
    if p.exitcode is None:
        os.kill(p.pid, signal.SIGKILL)
    p.join(60)


def no_temporaries(folder: Path):
    left = [p for p in folder.rglob(".*") if ".tmp" in p.name or ".old" in p.name]
    assert not left, f"temporaries left behind: {left}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, fork):
    """Images, a trained-for-one-epoch model, and the uninterrupted reference of each command with its duration."""
    tmp = tmp_path_factory.mktemp("faults")
    raw = gzip.decompress((DATA / "t10k-images-idx3-ubyte.gz").read_bytes())
    for k, im in enumerate(np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:40]):
        (tmp / f"imgs/c{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(tmp / f"imgs/c{k % 2}/{k:02d}.png")
    (tmp / "tiny.json").write_text(json.dumps(TINY))
    commands = {
        "train": ["train", "--preset", "cpu", "--config", tmp / "tiny.json", "--max-images", "96", "--no-eval", "-q"],
        "embed": ["embed", tmp / "ref_train", tmp / "imgs", "--shard-size", "4", "-b", "4", "--workers", "1", "-q"],
        "export": ["export", tmp / "ref_train"],
    }
    took = {}
    took["train"] = finish(fork, [*commands["train"], "--device", "cpu", "--out", tmp / "ref_train"])
    finish(fork, ["eval", tmp / "ref_train", "-q", "--device", "cpu"])  # the run's classes (classes.json)
    commands["classify"] = ["classify", *commands["embed"][1:]]
    took["classify"] = finish(fork, [*commands["classify"], "--out", tmp / "ref_classify"])
    took["embed"] = finish(fork, [*commands["embed"], "--out", tmp / "ref_embed"])
    took["cluster"] = finish(fork, ["cluster", tmp / "ref_embed", "--k", "3", "-q"])
    took["export"] = finish(fork, [*commands["export"], "--out", tmp / "ref_export"])
    ref = {k: tmp / f"ref_{k}" for k in ("train", "embed", "export", "classify")}
    return tmp, commands, ref, took


def test_embed_killed_anywhere_resumes_to_the_same_shards(setup, fork):
    tmp, commands, ref, took = setup
    m = manifest.load(ref["embed"])
    for seed in SEEDS:
        out = tmp / f"embed_{seed}"
        kill_at(fork, [*commands["embed"], "--out", out], np.random.default_rng(seed).uniform(0, took["embed"]))
        if manifest.load(out, strict=False) is not None and (out / "files.parquet").exists():
            for s in shards.done_shards(out, manifest.load(out)):  # what counts as done is the reference's
                np.testing.assert_array_equal(
                    np.load(shards.emb_path(out, s)), np.load(shards.emb_path(ref["embed"], s))
                )
        finish(fork, [*commands["embed"], "--out", out])
        assert manifest.load(out) == m
        for s in range(m.n_shards):
            np.testing.assert_array_equal(np.load(shards.emb_path(out, s)), np.load(shards.emb_path(ref["embed"], s)))
            assert pq.read_table(shards.meta_path(out, s)).equals(pq.read_table(shards.meta_path(ref["embed"], s)))
        assert (out / "summary.json").exists() and (out / "bad_files.txt").read_bytes() == b""
        no_temporaries(out)


def test_classify_killed_anywhere_resumes_to_the_same_classes(setup, fork):
    """A kill in the embedding or in the class step: the next run ends with the uninterrupted run's classes."""
    tmp, commands, ref, took = setup
    want = pq.read_table(ref["classify"] / "classes.parquet")
    assert want.num_rows == 40 and "class_name" in want.column_names  # classes from the run's classes.json
    for seed in SEEDS:
        out = tmp / f"classify_{seed}"
        kill_at(fork, [*commands["classify"], "--out", out], np.random.default_rng(seed).uniform(0, took["classify"]))
        finish(fork, [*commands["classify"], "--out", out])
        assert pq.read_table(out / "classes.parquet").equals(want)
        m = manifest.load(out)
        for s in range(m.n_shards):
            np.testing.assert_array_equal(
                np.load(shards.emb_path(out, s)), np.load(shards.emb_path(ref["classify"], s))
            )
        no_temporaries(out)


def _cluster_files(out: Path) -> dict:
    """The cluster set's content that does not depend on when it ran (metrics without timings, generation)."""
    metrics = json.loads((out / "metrics.json").read_text())
    for key in [k for k in metrics if k.startswith("seconds")] + ["generation"]:  # timings and the set's id
        metrics.pop(key)
    table = pq.read_table(out / "clusters.parquet").replace_schema_metadata(None)
    return {"metrics": metrics, "clusters": table.to_pydict(), "centroids": np.load(out / "centroids.npy").tolist()}


def test_cluster_killed_anywhere_never_leaves_a_mixed_set(setup, fork):
    import shutil

    tmp, _, ref, took = setup
    want = _cluster_files(ref["embed"])

    for seed in SEEDS:
        out = tmp / f"cluster_{seed}"
        shutil.copytree(ref["embed"], out)
        finish(fork, ["cluster", out, "--k", "2", "-q"])  # the previous set: k = 2
        before = _cluster_files(out)
        kill_at(fork, ["cluster", out, "--k", "3", "-q"], np.random.default_rng(seed).uniform(0, took["cluster"]))
        m = manifest.load(out)
        try:
            rec = outputs.read_set(out, "cluster", {"run_id": m.run_id, "files_sha256": m.files_sha256}, rerun="-")
        except DataError as e:  # killed while committing: every reader refuses the set until cluster runs again
            assert "half replaced" in str(e), e
            rec = None
        if rec is not None:
            now = _cluster_files(out)
            assert now in (before, want), "the set on disk mixes two cluster runs"
            assert json.loads((out / "metrics.json").read_text())["generation"] == rec["generation"]
        finish(fork, ["cluster", out, "--k", "3", "-q"])
        assert _cluster_files(out) == want
        no_temporaries(out)


def test_export_killed_anywhere_never_leaves_a_mixed_set(setup, fork):
    import shutil

    tmp, commands, ref, took = setup
    want = (ref["export"] / "model.onnx").read_bytes()
    finish(fork, [*commands["export"], "--out", tmp / "fp16_export", "--fp16"])  # the previous set: fp16
    fp16 = (tmp / "fp16_export" / "model.onnx").read_bytes()
    for seed in EXPORT_SEEDS:
        out = shutil.copytree(tmp / "fp16_export", tmp / f"export_{seed}")
        kill_at(fork, [*commands["export"], "--out", out], np.random.default_rng(seed).uniform(0, took["export"]))
        try:
            outputs.read_set(out, "export", rerun="-")
            summary = json.loads((out / "export.json").read_text())
            model = (out / "model.onnx").read_bytes()
            assert (summary["precision"], model) in (("fp16", fp16), ("fp32", want)), "a mixed export set"
        except DataError as e:  # killed while committing: refused until exported again
            assert "half replaced" in str(e), e
        (out / ".model.onnx.tmp999999").write_bytes(b"half a model")  # as a kill in its writing leaves it
        finish(fork, [*commands["export"], "--out", out])
        assert (out / "model.onnx").read_bytes() == want
        assert json.loads((out / "export.json").read_text())["precision"] == "fp32"
        no_temporaries(out)


def test_train_killed_anywhere_resumes_to_the_same_weights(setup, fork):
    from safetensors.torch import load_file

    from mixem import checkpoint as ckpt

    tmp, commands, ref, took = setup
    want = load_file(str(ckpt.resolve(ref["train"]) / "model.safetensors"))
    for seed in SEEDS:
        out = tmp / f"train_{seed}"
        args = [*commands["train"], "--device", "cpu", "--out", out]
        kill_at(fork, args, np.random.default_rng(seed).uniform(0, took["train"]))
        if (out / "checkpoints" / "latest").exists():
            ckpt.load_model(out)  # what `latest` names is whole
        if out.is_dir():  # as a kill while writing them leaves them (the mined neighbours, the metrics)
            for name in (".neighbors.npy.tmp999999", ".metrics.json.tmp999998"):
                (out / name).write_bytes(b"half a file")
            for d in (out / "checkpoints").glob("[!.]*_*"):  # and an evaluation's, in a finished checkpoint
                (d / ".classes.json.tmp999997").write_bytes(b"half a file")
        # The next run: --resume once the run saved its configs (with or without a checkpoint), else the same command.
        again = ["train", "--resume", "--out", out, "--no-eval", "-q", "--device", "cpu"]
        finish(fork, again if (out / "train_config.json").exists() else args)
        got = load_file(str(ckpt.resolve(out) / "model.safetensors"))
        assert ckpt.resolve(out).name == "selflabel_0001" and ckpt.read_state(out)["epoch"] == 1
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"{k} (seed {seed})")
        no_temporaries(out)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
