"""Choosing the crops without labels (mixem.candidates) and drawing the neighbour stage twice (mixem.draws): the
scores by hand, the candidates' and draws' configs, a real run whose kept candidate and kept draw are the ones the
rules pick, and kill -9 of the parent (its children die with it), during the candidates and again during the
draws, then --resume equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from cli_runs import cli
from safetensors.numpy import load_file

from mixem import checkpoint as ckpt
from mixem.candidates import (
    CHOICE_Z,
    agreement,
    candidates,
    choose,
    cross_per_image,
    shared_neighbors,
    skip_reason,
    z_over_first,
)
from mixem.config import TrainConfig, preset, replace
from mixem.draws import draws, objective
from mixem.errors import ConfigError
from mixem.metrics import clustering_metrics


def test_agreement_and_cross_agreement_by_hand():
    def cross_agreement(classes, neighbors):  # each partition's score: the mean of its per-image agreement
        return [float(x.mean()) for x in cross_per_image(classes, neighbors)]

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


def test_the_configured_views_stay_unless_another_wins_by_two_standard_errors():
    rng = np.random.default_rng(0)
    n = 400
    base = rng.uniform(0.6, 1.0, n)
    noise = rng.normal(0, 0.1, n)  # the paired per-image differences' spread: standard error 0.1 / 20 = 0.005
    for shift, kept in ((0.002, 0), (0.03, 1), (-0.03, 0)):  # a near tie, a clear win, a clear loss
        other = base + noise - noise.mean() + shift
        z = z_over_first([base, other])
        u = other - base
        assert z[0] == 0.0 and z[1] == pytest.approx(u.mean() / (u.std(ddof=1) / np.sqrt(n)))
        if shift == 0.002:  # the near tie: the other's cross-agreement is the higher, its z below CHOICE_Z
            assert other.mean() > base.mean() and 0 < z[1] < CHOICE_Z
        assert choose([{"cross_agreement": float(x.mean()), "z_over_configured": v}
                       for x, v in zip([base, other], z)]) == kept  # fmt: skip
    sixteenths = rng.integers(0, 15, n) / 16  # shares of 16 neighbours: exact in binary, so the difference is too
    assert z_over_first([sixteenths, sixteenths + 1 / 16]) == [0.0, np.inf]  # every image better alike: a sure win
    # three candidates: of those at CHOICE_Z or above, the highest cross-agreement; ties keep the earlier
    sc = [{"cross_agreement": 0.90, "z_over_configured": 0.0}, {"cross_agreement": 0.93, "z_over_configured": 2.5},
          {"cross_agreement": 0.95, "z_over_configured": 1.9}]  # fmt: skip
    assert choose(sc) == 1
    # per-image cross-agreement: each image's share of the other's neighbours in its class, its mean the score
    a, b = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    na, nbb = np.array([[1], [0], [3], [2]]), np.array([[2], [2], [1], [1]])
    assert [x.tolist() for x in cross_per_image([a, b], [na, nbb])] == [[0, 0, 0, 0], [0, 0, 1, 1]]


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
        assert c.train.refine_draws == 1  # nor draws: it is scored on one neighbour stage
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


def _objective_by_loops(probs: np.ndarray, nb: np.ndarray) -> float:
    pairs = [-np.log(max(float(probs[i] @ probs[j]), 1e-7)) for i in range(len(nb)) for j in nb[i]]
    mean = probs.mean(0)
    return float(np.mean(pairs)) + float((mean * np.log(mean)).sum())


def test_the_draws_objective_by_hand():
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.5, 0.5]])
    nb = np.array([[1, 3], [0, 2], [3, 1], [2, 0]])
    cons, ent = objective(p, nb, rows=3)  # two chunks: 3 rows, then 1
    assert np.isclose(cons - ent, _objective_by_loops(p, nb))
    assert np.isclose(ent, -(0.575 * np.log(0.575) + 0.425 * np.log(0.425)))  # the mean is (0.575, 0.425)
    # one class for everything agrees perfectly (consistency 0) but has no entropy: a spread partition with the
    # same neighbours scores lower, so a collapsed draw is not kept
    one = np.tile([[1.0, 0.0]], (4, 1))
    spread = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    paired = np.array([[1], [0], [3], [2]])
    assert np.subtract(*objective(one, paired)) == 0 and np.isclose(np.subtract(*objective(spread, paired)), -np.log(2))


def test_draws_are_seeds_of_the_final_run(tmp_path):
    _, t = preset("cpu")
    t = replace(t, out=str(tmp_path / "run"), seed=7, refine_draws=3)
    found = draws(t, threads=1)
    assert [(d.name, d.seed, d.train.seed) for d in found] == [("draw-0", 7, 7), ("draw-1", 8, 8), ("draw-2", 9, 9)]
    for d in found:
        assert d.dir == tmp_path / "run" / "draws" / d.name and d.train.threads == 1 and d.train.refine_draws == 1
        assert (d.train.refine_epochs, d.train.crop_scale) == (t.refine_epochs, t.crop_scale)
    with pytest.raises(ConfigError, match="refine_draws"):
        TrainConfig(refine_draws=0)


def _probs(run: Path, images) -> np.ndarray:
    from mixem.evaluate import extract_features

    model, _ = ckpt.load_model(run)
    return extract_features(model, images)["probs"]


def _saved_keep(run: Path) -> bool:
    return json.loads((run / "train_config.json").read_text())["keep_features"]


@pytest.mark.parametrize("n_draws", [2, 1])
def test_a_real_run_keeps_the_candidate_and_the_draw_the_rules_pick(tmp_path, capsys, n_draws):
    """Both candidates train; the choice is recomputed here from the candidates' own saved models and
    neighbours, without the labels; OUT holds the kept one's representation, and its neighbour stage on the
    shared neighbours: the lower-objective one of two draws (recomputed here too), or one trained in OUT."""
    import mixem
    from mixem.data import load_images

    run = mixem.train(out=tmp_path / "run", preset="cpu", max_images=384, epochs=3, refine_epochs=2, device="cpu",
                      quiet=False, refine_draws=n_draws)  # fmt: skip
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
        classes.append(_probs(d, ds.images).argmax(1))
        nbs.append(np.load(d / "neighbors.npy")[:, :20])
    cross = [agreement(classes[0], nbs[1]), agreement(classes[1], nbs[0])]
    assert [c["cross_agreement"] for c in record["candidates"]] == [round(x, 4) for x in cross]
    # each candidate's classes against the labels, for the record: computed by OUT's run from their saved models
    # (the candidates are trained without scoring themselves: no metrics files of their own)
    for c, cl in zip(record["candidates"], classes):
        m = clustering_metrics(ds.labels, cl)
        assert (c["acc"], c["nmi"]) == (round(m["acc"], 4), round(m["nmi"], 4))
        assert not (out / "candidates" / c["name"] / "metrics.json").exists()
    assert "the candidates against the labels (not used to choose): crops-35-100_80-100 ACC" in said
    per = [(classes[0][nbs[1]] == classes[0][:, None]).mean(1), (classes[1][nbs[0]] == classes[1][:, None]).mean(1)]
    u = per[1] - per[0]
    z = u.mean() / (u.std(ddof=1) / np.sqrt(len(u)))
    assert record["candidates"][1]["z_over_configured"] == pytest.approx(z, abs=0.006)
    best = int(z >= CHOICE_Z)  # the configured views unless the other wins by two standard errors
    assert f"against the configured views: {record['candidates'][1]['z_over_configured']:+.2f} standard" in said
    kept = record["candidates"][best]["name"]
    assert record["kept"] == kept
    # OUT: the kept representation (its last epoch, weights unchanged), then the full neighbour stage
    kept_dir = out / "candidates" / kept
    last = ckpt.newest(kept_dir, "epoch").name
    assert _same(load_file(str(out / "checkpoints" / last / "model.safetensors")), _weights_of(kept_dir, last))
    assert ckpt.resolve(out).name == "neighbors_0002" and not _same(_weights(out), _weights(kept_dir))
    # the representation's features, kept by the candidate (keep_features), one file linked into OUT's copy and
    # each draw's (mixem.feature_cache), where they were read instead of extracted again
    features = kept_dir / "checkpoints" / last / "features.npz"
    copies = [out / "checkpoints" / last] + [out / "draws" / d / "checkpoints" / last for d in ("draw-0", "draw-1")]
    for copy in copies if n_draws == 2 else copies[:1]:
        assert os.stat(copy / "features.npz").st_ino == os.stat(features).st_ino
    with np.load(features) as kept_features:
        assert np.array_equal(kept_features["probs"], _probs(kept_dir / "checkpoints" / last, ds.images))
    assert _saved_keep(kept_dir) and not _saved_keep(out)
    shared = np.load(out / "neighbors.npy")
    assert np.array_equal(shared, shared_neighbors([nbs[best], nbs[1 - best]]))
    if n_draws == 2:
        drawn = json.loads((out / "draws.json").read_text())
        objectives = [_objective_by_loops(_probs(out / "draws" / n, ds.images), shared) for n in ("draw-0", "draw-1")]
        assert [d["objective"] for d in drawn["draws"]] == pytest.approx(objectives, abs=1e-4)
        assert [d["seed"] for d in drawn["draws"]] == [0, 1] and drawn["kept"] == f"draw-{int(np.argmin(objectives))}"
        kept_draw = out / "draws" / drawn["kept"]
        assert _same(_weights(out), _weights(kept_draw)) and ckpt.resolve(kept_draw).name == "neighbors_0002"
        for d in ("draw-0", "draw-1"):  # each from the kept representation, on the shared neighbours
            assert np.array_equal(np.load(out / "draws" / d / "neighbors.npy"), shared)
            assert said.count(f"  {d}: neighbour stage epoch 2 ") == 1, said
        assert run.metrics["draws"]["kept"] == drawn["kept"]
        each = ", ".join(
            f"{d['name']} {d['objective']:.4f} (consistency {d['consistency']:.4f})" for d in drawn["draws"]
        )
        seed = next(d["seed"] for d in drawn["draws"] if d["name"] == drawn["kept"])
        assert f"neighbour stage kept: {drawn['kept']} (seed {seed}), the lowest objective of {each}" in said
    else:
        assert not (out / "draws").exists() and "draws" not in run.metrics
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["out"] == str(out) and saved["candidate_crop_scale"] is None and saved["refine_epochs"] == 2
    assert json.loads((ckpt.resolve(out) / "train_config.json").read_text())["refine_epochs"] == 2
    assert run.metrics["candidates"]["kept"] == kept and run.headline["acc"] > 0
    assert json.loads((out / "metrics.json").read_text())["candidates"]["kept"] == kept
    assert "shared neighbours:" in said and said.count("SimCLR + refinement (argmax of the refined head)") == 1
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


def _kill_when(proc, ready, what: str) -> None:
    """SIGKILL `proc` once ready() holds with two children running; its children must end with it."""
    import os
    import signal

    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before {what}"
    children = _children(proc.pid)
    assert len(children) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(p) for p in children):
        time.sleep(0.05)
    assert not any(_alive(p) for p in children), "a child outlived the killed parent"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the children's processes")
def test_kill_the_parent_then_resume_equals_uninterrupted(tmp_path):
    """SIGKILL of `train` while its candidates train, and again while its neighbour-stage draws train: the
    children end with it (no orphan keeps writing), and `--resume` finishes both, keeping the same candidate and
    the same draw with the same weights as a run never killed."""
    import subprocess

    killed = tmp_path / "killed"
    cmd, kw = cli(*SMALL, "--out", str(killed), "--quiet", "--no-eval", cwd=tmp_path)
    cands = killed / "candidates"
    ready = lambda: sum((d / "checkpoints" / "latest").exists() for d in cands.glob("crops-*")) == 2  # noqa: E731
    _kill_when(subprocess.Popen(cmd, **kw), ready, "both candidates had a checkpoint")
    assert not (killed / "checkpoints" / "latest").exists()
    resume, kw = cli("--resume", "--out", str(killed), "--quiet", "--no-eval", cwd=tmp_path)
    ready = lambda: len(list((killed / "draws").glob("draw-*/log.jsonl"))) == 2  # noqa: E731
    _kill_when(subprocess.Popen(resume, **kw), ready, "both draws had started")
    assert not (killed / "checkpoints" / "latest").exists()  # the draws' choice writes it
    subprocess.run(resume, **kw, check=True)
    cmd, kw = cli(*SMALL, "--out", str(tmp_path / "full"), "--quiet", "--no-eval", cwd=tmp_path)
    subprocess.run(cmd, **kw, check=True)
    for record in ("candidates.json", "draws.json"):
        kept = [json.loads((tmp_path / r / record).read_text())["kept"] for r in ("killed", "full")]
        assert kept[0] == kept[1]
    assert _same(_weights(killed), _weights(tmp_path / "full"))
    for name in ("crops-35-100_80-100", "crops-80-100"):
        assert _same(_weights(cands / name), _weights(tmp_path / "full" / "candidates" / name))
    for name in ("draw-0", "draw-1"):
        assert _same(_weights(killed / "draws" / name), _weights(tmp_path / "full" / "draws" / name))


def test_a_resumed_run_passes_its_epochs_and_device_to_both_candidates(tmp_path):
    """`train --resume --epochs N` reaches each started candidate (not silently dropped); one never started
    begins from its spec under a preset the command line takes, even when the parent's name is "resumed"."""
    from mixem import children

    train = replace(preset("cpu")[1], out=str(tmp_path / "run"))
    started, fresh = candidates(train, threads=1)
    started.dir.mkdir(parents=True)
    (started.dir / "train_config.json").write_text("{}")
    model = preset("cpu")[0]
    assert children.command(started, model, "resumed", ["--epochs=5", "--device=cpu"])[-4:] == [
        "--resume", "--epochs=5", "--device=cpu", "--no-eval"
    ]  # fmt: skip
    cmd = children.command(fresh, model, "resumed", ["--epochs=5"])
    assert cmd[cmd.index("--preset") + 1] == "cpu" and "--resume" not in cmd and cmd[-1] == "--no-eval"
    spec = json.loads((tmp_path / "run" / "candidates" / f"{fresh.name}.json").read_text())
    assert spec["train"]["crop_scale"] == [0.8, 1.0] and spec["train"]["out"] == str(fresh.dir)


def test_run_all_hands_each_child_to_on_done_as_it_ends(tmp_path, monkeypatch):
    """run_all calls on_done for each child as it ends, with how many still train; freed_core scores it on the
    threads those leave free and gives the parent its threads back (real processes of unequal length)."""
    import sys

    import torch

    from mixem import children
    from mixem.runlog import RunLog

    sleeps = {"fast": 0.2, "slow": 2.5}
    monkeypatch.setattr(
        children, "command", lambda c, *a: [sys.executable, "-c", f"import time; time.sleep({sleeps[c.name]})"]
    )
    kids = [
        children.Child(name, replace(TrainConfig(), out=str(tmp_path / name), threads=1)) for name in ("slow", "fast")
    ]
    seen, results = [], {}

    def compute(c):
        seen.append((c.name, torch.get_num_threads()))
        return c.name.upper()

    before = torch.get_num_threads()
    children.run_all(kids, None, "cpu", parallel=True, log=RunLog(quiet=True),
                     on_done=children.freed_core(compute, results, cores=4))  # fmt: skip
    assert seen == [("fast", 3), ("slow", 4)]  # 4 cores: the slow child's one thread still busy, then none
    assert results == {"fast": "FAST", "slow": "SLOW"} and torch.get_num_threads() == before
