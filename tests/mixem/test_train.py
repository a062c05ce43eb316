"""Training: the loss falls, a killed run resumes to the same weights, NaN stops cleanly, pickles are refused."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from cli_runs import cli, kill_when
from safetensors.torch import load_file

from mixem import checkpoint as ckpt
from mixem import optim
from mixem import training as train_mod
from mixem.config import MixEMConfig, TrainConfig
from mixem.data import load_images
from mixem.errors import CheckpointError, TrainingDiverged
from mixem.model import MixEM

TINY_MODEL = dict(backbone="convnet", width=8, image_size=28, in_channels=1, head_hidden=16, mean=(0.29,), std=(0.35,))
TINY_TRAIN = dict(
    batch_size=64,
    epochs=3,
    optimizer="adamw",
    lr=2e-3,
    warmup_epochs=0.5,
    temperature=0.2,
    crop_scale=(0.35, 1.0),
    blur=False,
    grayscale_p=0.0,
)


@pytest.fixture(scope="module")
def fmnist512():
    return load_images(None, image_size=28, in_channels=1, max_images=512)


def test_short_run_loss_falls(fmnist512, tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "run"), **TINY_TRAIN)
    model, result = train_mod.train(MixEMConfig(**TINY_MODEL), cfg, fmnist512.images)
    first, last = result.history[0], result.history[-1]
    assert last["loss"] < first["loss"] and last["ntxent"] < first["ntxent"], result.history
    assert {"ntxent", "marginal_entropy", "instance", "pull", "push", "loss"} <= set(first)
    # The run directory holds a loadable checkpoint equal to the returned model.
    loaded, _ = ckpt.load_model(tmp_path / "run")
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_resumed_finished_stage_builds_no_optimizer(fmnist512, tmp_path, monkeypatch):
    """A resumed run whose stage is finished restores the model alone (no optimizer: torch's imports torch._dynamo,
    ~1 s of the quickstart's tail); one with epochs left builds one and restores it, as before."""
    cfg = TrainConfig(out=str(tmp_path / "run"), **{**TINY_TRAIN, "epochs": 2})
    model, _ = train_mod.train(MixEMConfig(**TINY_MODEL), cfg, fmnist512.images)
    built = []
    real = train_mod.make_optimizer
    monkeypatch.setattr(train_mod, "make_optimizer", lambda *a, **k: built.append(1) or real(*a, **k))
    again, result = train_mod.train(MixEMConfig(**TINY_MODEL), cfg, fmnist512.images, resume=True)
    assert built == [] and result.history == []
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    longer = TrainConfig(out=str(tmp_path / "run"), **{**TINY_TRAIN, "epochs": 3})
    _, result = train_mod.train(MixEMConfig(**TINY_MODEL), longer, fmnist512.images, resume=True)
    assert built == [1] and [r["epoch"] for r in result.history] == [3]


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    conf = tmp_path / "tiny.json"
    conf.write_text(json.dumps({"model": TINY_MODEL, "train": {**TINY_TRAIN, "epochs": 4}}))
    common = [
        "--preset",
        "cpu",
        "--config",
        str(conf),
        "--max-images",
        "768",
        "--no-eval",
        "--no-refine",  # the representation stage alone (tests/mixem/test_refine.py kills a refinement)
        "--quiet",
        "--device",
        "cpu",
    ]
    cmd, kw = cli(*common, "--out", str(tmp_path / "full"), cwd=tmp_path)
    subprocess.run(cmd, check=True, timeout=300, **kw)

    cmd, kw = cli(*common, "--out", str(tmp_path / "killed"), cwd=tmp_path)
    done = kill_when(cmd, kw, tmp_path / "killed", lambda name: True)
    assert done != "epoch_0004", "the run finished before it could be killed; make the epochs longer"
    cmd, kw = cli("--resume", "--out", str(tmp_path / "killed"), "--no-eval", "--quiet", cwd=tmp_path)
    subprocess.run(cmd, check=True, timeout=300, **kw)

    a = load_file(str(ckpt.resolve(tmp_path / "full") / "model.safetensors"))
    b = load_file(str(ckpt.resolve(tmp_path / "killed") / "model.safetensors"))
    assert ckpt.read_state(tmp_path / "killed")["epoch"] == 4
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs after resume from {done}")


def test_nan_loss_stops_and_keeps_last_checkpoint(fmnist512, tmp_path, monkeypatch):
    real = train_mod.objective
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        terms = real(*args)
        if calls["n"] == 10:  # epoch 2 (8 steps per epoch)
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(train_mod, "objective", poisoned)
    cfg = TrainConfig(out=str(tmp_path / "run"), **TINY_TRAIN)
    with pytest.raises(TrainingDiverged, match="epoch 2, step 2.*epoch_0001"):
        train_mod.train(MixEMConfig(**TINY_MODEL), cfg, fmnist512.images)
    assert ckpt.read_state(tmp_path / "run")["epoch"] == 1


def test_pickle_checkpoint_refused(tmp_path):
    model = MixEM(MixEMConfig(**TINY_MODEL))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="pickle checkpoints are refused"):
        ckpt.load_model(tmp_path / "model.pt")
    # A checkpoint directory whose trainer state smuggles a Python object is refused too.
    ckpt.save_checkpoint(tmp_path / "c", model, MixEMConfig(**TINY_MODEL), trainer_state={"x": torch.zeros(1)})
    torch.save({"evil": Path("/")}, tmp_path / "c" / ckpt.TRAINER)
    with pytest.raises(CheckpointError, match="refused"):
        ckpt.load_trainer_state(tmp_path / "c")


@pytest.mark.parametrize("optimizer", ["adamw", "adam"])
def test_optimizer_is_fused_and_steps_as_the_loop_over_tensors(optimizer):
    """make_optimizer takes torch's fused kernel on the CPU; from one start, on fresh random gradients of odd-sized
    tensors, its parameters and moments follow the loop over tensors (torch's default there) to fp32 rounding;
    a trainer state saved by the loop (a run before stop 44) loads into it and steps on."""
    cfg = TrainConfig(optimizer=optimizer, weight_decay=1e-2)
    g = torch.Generator().manual_seed(7)
    start = [torch.randn(s, generator=g) for s in [(17, 3, 3, 3), (5,), (31, 129)]]
    params = {k: [p.clone().requires_grad_() for p in start] for k in ("fused", "loop")}
    opts = {k: optim.make_optimizer(params[k], 3e-3, cfg, fused=k == "fused") for k in params}
    assert opts["fused"].defaults["fused"] and not opts["loop"].defaults["fused"]
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in start]
        for k, opt in opts.items():
            for p, gr in zip(params[k], grads):
                p.grad = gr.clone()
            opt.step()
    for a, b in zip(params["fused"], params["loop"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    resumed = optim.make_optimizer([p.detach().clone().requires_grad_() for p in params["loop"]], 3e-3, cfg)
    resumed.load_state_dict(opts["loop"].state_dict())
    for p in resumed.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    resumed.step()  # the loop's state (its step counts) steps on


def test_lr_schedule_shape():
    f = [optim.lr_factor(s, 10, 110) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))  # non-increasing after warm-up
    assert f[-1] < 0.001


def test_a_log_line_cut_by_a_kill_does_not_swallow_the_next_event(tmp_path):
    from mixem.report_train import read_log
    from mixem.runlog import RunLog

    path = tmp_path / "log.jsonl"
    RunLog(path, quiet=True).event("epoch", epoch=0)  # a new file
    path.write_text('{"event": "epoch", "epoch": 1}\n{"event": "ep')  # a kill cut the last line short
    RunLog(path, quiet=True).event("epoch", epoch=2)
    assert [e["epoch"] for e in read_log(path)] == [1, 2]
    RunLog(path, quiet=True).event("epoch", epoch=3)  # an intact last line: no blank line added
    assert "\n\n" not in path.read_text() and [e["epoch"] for e in read_log(path)] == [1, 2, 3]
    path.write_text("")
    RunLog(path, quiet=True).event("epoch", epoch=4)
    assert path.read_text().startswith('{"event": "epoch"')
