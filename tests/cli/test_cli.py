"""The CLI through Typer's CliRunner: the quickstart path on real data, and one-line errors for bad input."""

import json

import pytest
from typer.testing import CliRunner

from mixem.cli.app import app

runner = CliRunner()
TINY = {
    "model": dict(backbone="convnet", width=8, head_hidden=16),
    "train": dict(batch_size=64, epochs=1, refine_epochs=1, selflabel_epochs=1),
}


def _one_error_line(result):
    """Exit 1, no traceback anywhere, and stderr is exactly one line: 'error: <what and what to do>'."""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _train(tmp_path, *args: str):
    """`mixem-fast train` on the embedded data with a tiny convnet into tmp_path/run: (result, run folder)."""
    conf = tmp_path / "tiny.json"
    conf.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    cmd = ["train", "--preset", "cpu", "--config", str(conf), "--out", str(out), "--quiet", "--device", "cpu", *args]
    return runner.invoke(app, cmd), out


def test_train_then_eval_prints_comparison(tmp_path):
    r, out = _train(tmp_path, "--max-images", "640", "--method", "mixem")
    assert r.exit_code == 0, r.output
    last = r.output.strip().splitlines()[-1]
    metrics = json.loads((out / "metrics.json").read_text())
    head = metrics["headline"]
    assert head["method"] == "mixem" and head["name"] == "MIX'EM + refinement (argmax of the refined head)"
    assert last.startswith(f"{head['name']}  ACC {head['acc']:.3f}  NMI {head['nmi']:.3f}")
    assert "raw-pixel k-means" in last
    # One row per stage: the representation's k-means (MIX'EM's start, k-means++, the lower objective), then
    # the head's argmax after each refinement stage; the headline is the last one.
    stages = metrics["stages"]
    assert [(r["features"], r["init"].split(" (")[0]) for r in stages] == [
        ("representation", "k-means from the head's groups"),
        ("representation", "k-means++"),
        ("representation", "lower objective"),
        ("after neighbour consistency", "argmax of the head"),
        ("after self-labelling", "argmax of the head"),
    ]
    assert stages[-1] == {k: v for k, v in head.items() if k not in ("method", "name")} and metrics["images"] == 640
    same = [row for row in metrics["rows"] if (row["features"], row["init"]) == ("embedding", "mixture")]
    assert [{**same[0], "features": "representation", "init": "k-means from the head's groups"}] == stages[:1]
    r = runner.invoke(app, ["eval", str(out), "--max-images", "300", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "raw-pixel k-means" in r.output.strip().splitlines()[-1]
    r = runner.invoke(
        app, ["eval", str(out), *"--max-images 300 --quiet --features top_component --init random --raw".split()]
    )
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1].startswith("MIX'EM (top_component, random)")
    rows = json.loads((out / "checkpoints" / "selflabel_0001" / "metrics.json").read_text())["rows"]
    assert {(r["features"], r["init"]) for r in rows} == {("top_component", "random"), ("mixture argmax", "-")}


def test_each_method_names_its_own_headline(tmp_path):
    """Each method names its own headline (SimCLR's once ended with MIX'EM's, stored under the key "mixem"); here
    SimCLR is the cpu preset's own method, no --method given."""
    r, out = _train(tmp_path, "--max-images", "256", "--no-refine")
    assert r.exit_code == 0, r.output
    head = json.loads((out / "metrics.json").read_text())["headline"]
    assert (head["method"], head["name"], head["init"]) == ("simclr", "SimCLR (k-means++ on the embedding)", "kmeans++")
    assert r.output.strip().splitlines()[-1].startswith("SimCLR (k-means++ on the embedding)  ACC")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "/no/such/dir"], "/no/such/dir"),
        (["train", "--backbone", "vgg11"], "unknown backbone"),
        (["train", "-k", "1"], "at least 2"),
        (["train", "--image-size", "4"], "image_size"),
        (["train", "--resume", "--out", "/no/such/run"], "/no/such/run"),
        (["eval", "/no/such/ckpt"], "checkpoint not found"),
        (["bench", "nope"], "unknown benchmark"),
        (["eval", "/no/such/ckpt", "--features", "pixels"], "--features"),
    ],
)
def test_bad_input_one_line(args, needle):
    assert needle in _one_error_line(runner.invoke(app, args))


def test_default_out_never_collides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    conf = tmp_path / "tiny.json"
    conf.write_text(json.dumps(TINY))
    args = ["train", "--preset", "cpu", "--config", str(conf), "--max-images", "128", "--no-eval", "--quiet"]
    for _ in range(2):
        assert runner.invoke(app, args).exit_code == 0
    assert (tmp_path / "runs/mixem/checkpoints/latest").exists() and (
        tmp_path / "runs/mixem-2/checkpoints/latest"
    ).exists()
    # An explicit --out is the user's choice: an existing run there is refused, never overwritten.
    assert "--resume" in _one_error_line(runner.invoke(app, args + ["--out", "runs/mixem"]))


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    line = _one_error_line(runner.invoke(app, ["train", str(tmp_path / "empty"), "--no-eval"]))
    assert str(tmp_path / "empty") in line


def test_batch_larger_than_data(tmp_path):
    line = _one_error_line(
        runner.invoke(
            app, ["train", "--max-images", "10", "--batch-size", "64", "--out", str(tmp_path / "r"), "--no-eval"]
        )
    )
    assert "--batch-size 64" in line


def test_pickle_checkpoint_refused_by_eval(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"\x80\x04K\x01.")
    assert "pickle" in _one_error_line(runner.invoke(app, ["eval", str(tmp_path / "model.pt")]))
