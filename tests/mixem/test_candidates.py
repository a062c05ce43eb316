"""Choosing the crops without labels (mixem.candidates): the score by hand, the candidates' configs, a real run
whose kept candidate is the one the rule picks, and kill -9 of the parent (its candidates die with it) then
--resume equal to an uninterrupted run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from cli_runs import cli
from safetensors.numpy import load_file

from mixem import checkpoint as ckpt
from mixem.candidates import agreement, candidates, cross_agreement, shared_neighbors, skip_reason
from mixem.config import TrainConfig, preset, replace
from mixem.errors import ConfigError


def test_agreement_and_cross_agreement_by_hand():
    classes = np.array([0, 0, 1, 1])
    nb = np.array([[1, 2], [0, 3], [3, 0], [2, 1]])  # pairs 0-1 0-2 1-0 1-3 2-3 2-0 3-2 3-1: every other one same
    assert agreement(classes, nb) == 0.5
    a, b = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    na = np.array([[1], [0], [3], [2]])  # a's neighbours: a agrees 4/4 with them, b 2/4 (0-1 and 1-0 differ)
    nbb = np.array([[2], [2], [1], [1]])  # b's neighbours: b agrees 3/4 (0-2 differs), a 0/4
    assert agreement(a, na) == 1.0 and agreement(b, nbb) == 0.75 and agreement(a, nbb) == 0.0
    # Own agreement would keep a (1.0 > 0.75); against the OTHER's neighbours b is kept (0.5 > 0.0).
    assert cross_agreement([a, b], [na, nbb]) == [0.0, 0.5]
    c, nc = np.array([1, 1, 0, 0]), np.array([[3], [2], [1], [0]])  # a agrees 0/4 with nc, b 2/4; c: 1.0 na, 0.0 nbb
    assert cross_agreement([a, b, c], [na, nbb, nc]) == [0.0, 0.5, 0.5]  # the mean over the two others' neighbours


def test_shared_neighbors_by_hand():
    a = np.array([[1, 2, 3], [0, 2, 3], [4, 0, 1], [0, 1, 2]])
    b = np.array([[3, 4, 1], [4, 1, 0], [3, 1, 0], [3, 4, 5]])
    # Row 0 shares 1 and 3 (in a's order, repeated to fill 3 places); row 1 only 0; row 2 shares 0 and 1;
    # row 3 none: each list's nearest in turn (0 from a, 3 from b).
    assert shared_neighbors([a, b]).tolist() == [[1, 3, 1], [0, 0, 0], [0, 1, 0], [0, 3, 0]]
    assert shared_neighbors([a, a]).tolist() == a.tolist()  # a list shares all of itself
    c = np.array([[3, 2, 1], [2, 3, 0], [1, 0, 2], [5, 6, 7]])  # three lists: what all three hold
    assert shared_neighbors([a, b, c]).tolist() == [[1, 3, 1], [0, 0, 0], [0, 1, 0], [0, 3, 5]]


def test_candidates_are_the_configured_views_and_both_views_at_the_candidate_range(tmp_path):
    _, t = preset("cpu")
    t = replace(t, out=str(tmp_path / "run"))
    first, second = candidates(t, threads=1)
    assert (first.name, first.crops) == ("crops-35-100_80-100", "35-100 % and 80-100 %")
    assert (second.name, second.crops) == ("crops-80-100", "both views 80-100 %")
    assert first.train.crop_scale == (0.35, 1.0) and first.train.second_crop_scale == (0.8, 1.0)
    assert second.train.crop_scale == (0.8, 1.0) and second.train.second_crop_scale is None
    for c in (first, second):
        assert c.dir == tmp_path / "run" / "candidates" / c.name and c.train.threads == 1
        assert c.train.candidate_crop_scale is None  # a candidate has no candidates of its own
        assert (c.train.epochs, c.train.min_steps, c.train.seed) == (t.epochs, t.min_steps, t.seed)
        # a neighbour stage of half the final one's length: enough to score the candidate
        assert (c.train.refine_epochs, c.train.refine_min_steps) == (t.refine_epochs // 2, t.refine_min_steps // 2)
    with pytest.raises(ConfigError, match="repeats the configured views"):
        candidates(replace(t, crop_scale=(0.8, 1.0), second_crop_scale=(0.8, 1.0)), threads=1)
    with pytest.raises(ConfigError, match="candidate_crop_scale must be two numbers"):
        TrainConfig(candidate_crop_scale=(0.9, 0.5))
    assert skip_reason(t) is None and "--no-refine" in skip_reason(replace(t, refine=False))
    assert "0 epochs" in skip_reason(replace(t, refine_epochs=0))


SMALL = ["--max-images", "384", "--epochs", "3", "--refine-epochs", "2", "--device", "cpu"]


def _weights(run: Path) -> dict:
    return load_file(str(ckpt.resolve(run) / "model.safetensors"))


def _weights_of(run: Path, checkpoint: str) -> dict:
    return load_file(str(run / "checkpoints" / checkpoint / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_real_run_keeps_the_candidate_the_rule_picks(tmp_path, capsys):
    """Both candidates train; the choice is recomputed here from the candidates' own saved models and
    neighbours, without the labels; OUT holds the kept one's representation, refined on the shared neighbours."""
    import mixem
    from mixem.data import load_images
    from mixem.evaluate import extract_features

    run = mixem.train(
        out=tmp_path / "run", preset="cpu", max_images=384, epochs=3, refine_epochs=2, device="cpu", quiet=False
    )
    said = capsys.readouterr().out  # each candidate's epochs, read from its log.jsonl as it grows
    for name in ("crops-35-100_80-100", "crops-80-100"):
        assert said.count(f"  {name}: representation epoch 3/3 ") == 1, said
        assert said.count(f"  {name}: neighbour stage epoch 1 ") == 1, said  # half of OUT's 2
        assert f"  {name}: neighbour stage epoch 2 " not in said
    out = tmp_path / "run"
    record = json.loads((out / "candidates.json").read_text())
    assert [c["name"] for c in record["candidates"]] == ["crops-35-100_80-100", "crops-80-100"]
    ds = load_images(None, image_size=28, in_channels=1, max_images=384)
    classes, nbs = [], []
    for c in record["candidates"]:
        d = out / "candidates" / c["name"]
        model, _ = ckpt.load_model(d)
        classes.append(extract_features(model, ds.images)["probs"].argmax(1))
        nbs.append(np.load(d / "neighbors.npy")[:, :20])
    cross = [agreement(classes[0], nbs[1]), agreement(classes[1], nbs[0])]
    assert [c["cross_agreement"] for c in record["candidates"]] == [round(x, 4) for x in cross]
    best = int(np.argmax(cross))
    kept = record["candidates"][best]["name"]
    assert record["kept"] == kept
    # OUT: the kept representation (its last epoch, weights unchanged), then its own full neighbour stage
    kept_dir = out / "candidates" / kept
    last = ckpt.newest(kept_dir, "epoch").name
    assert _same(load_file(str(out / "checkpoints" / last / "model.safetensors")), _weights_of(kept_dir, last))
    assert ckpt.resolve(out).name == "neighbors_0002" and not _same(_weights(out), _weights(kept_dir))
    assert np.array_equal(np.load(out / "neighbors.npy"), shared_neighbors([nbs[best], nbs[1 - best]]))
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["out"] == str(out) and saved["candidate_crop_scale"] is None and saved["refine_epochs"] == 2
    assert json.loads((ckpt.resolve(out) / "train_config.json").read_text())["refine_epochs"] == 2
    assert run.metrics["candidates"]["kept"] == kept and run.headline["acc"] > 0
    assert json.loads((out / "metrics.json").read_text())["candidates"]["kept"] == kept
    assert "shared neighbours:" in said and said.count("MIX'EM + refinement (argmax of the refined head)") == 1
    assert (out / "report.html").is_file() and (ckpt.resolve(out) / "classes.json").is_file()
    with pytest.raises(ConfigError, match="already holds a run"):
        mixem.train(out=out, preset="cpu", max_images=384, epochs=3, refine_epochs=2, device="cpu")


def test_no_refine_trains_the_configured_views_only(tmp_path, capsys):
    import mixem

    mixem.train(out=tmp_path / "run", preset="cpu", max_images=256, epochs=1, refine=False, device="cpu", quiet=False)
    assert "candidate crops: not chosen" in capsys.readouterr().out
    assert not (tmp_path / "run" / "candidates").exists()
    saved = json.loads((ckpt.resolve(tmp_path / "run") / "train_config.json").read_text())
    assert saved["crop_scale"] == [0.35, 1.0] and saved["second_crop_scale"] == [0.8, 1.0]


def _children(pid: int) -> list[int]:
    """The processes whose parent is pid (read from /proc/*/stat: field 4 after the command's parentheses)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status  # a zombie has ended


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the candidates' processes")
def test_kill_the_parent_then_resume_equals_uninterrupted(tmp_path):
    """SIGKILL of `train` while its candidates train: they end with it (no orphan keeps writing), and
    `--resume` finishes both and keeps the same candidate with the same weights as a run never killed."""
    import os
    import signal
    import subprocess

    cmd, kw = cli(*SMALL, "--out", str(tmp_path / "killed"), "--quiet", "--no-eval", cwd=tmp_path)
    proc = subprocess.Popen(cmd, **kw)
    cands = tmp_path / "killed" / "candidates"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if sum((d / "checkpoints" / "latest").exists() for d in cands.glob("crops-*")) == 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before both candidates had a checkpoint"
    children = _children(proc.pid)
    assert len(children) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(p) for p in children):
        time.sleep(0.05)
    assert not any(_alive(p) for p in children), "a candidate outlived the killed parent"
    assert not (tmp_path / "killed" / "checkpoints" / "latest").exists()
    cmd, kw = cli("--resume", "--out", str(tmp_path / "killed"), "--quiet", "--no-eval", cwd=tmp_path)
    subprocess.run(cmd, **kw, check=True)
    cmd, kw = cli(*SMALL, "--out", str(tmp_path / "full"), "--quiet", "--no-eval", cwd=tmp_path)
    subprocess.run(cmd, **kw, check=True)
    kept = [json.loads((tmp_path / r / "candidates.json").read_text())["kept"] for r in ("killed", "full")]
    assert kept[0] == kept[1]
    assert _same(_weights(tmp_path / "killed"), _weights(tmp_path / "full"))
    for name in ("crops-35-100_80-100", "crops-80-100"):
        assert _same(_weights(cands / name), _weights(tmp_path / "full" / "candidates" / name))


def test_a_resumed_run_passes_its_epochs_and_device_to_both_candidates(tmp_path):
    """`train --resume --epochs N` reaches each started candidate (not silently dropped); one never started
    begins from its spec under a preset the command line takes, even when the parent's name is "resumed"."""
    from mixem import candidates as cand

    train = replace(preset("cpu")[1], out=str(tmp_path / "run"))
    started, fresh = candidates(train, threads=1)
    started.dir.mkdir(parents=True)
    (started.dir / "train_config.json").write_text("{}")
    model = preset("cpu")[0]
    assert cand._command(started, model, "resumed", True, ["--epochs=5", "--device=cpu"])[-3:] == [
        "--resume", "--epochs=5", "--device=cpu"
    ]  # fmt: skip
    cmd = cand._command(fresh, model, "resumed", False, ["--epochs=5"])
    assert cmd[cmd.index("--preset") + 1] == "cpu" and "--resume" not in cmd and cmd[-1] == "--no-eval"
    spec = json.loads((tmp_path / "run" / "candidates" / f"{fresh.name}.json").read_text())
    assert spec["train"]["crop_scale"] == [0.8, 1.0] and spec["train"]["out"] == str(fresh.dir)
