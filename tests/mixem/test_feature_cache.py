"""The representation's features kept in its checkpoint (mixem.feature_cache): written only when asked, read back
bit for bit instead of extracted, never read for other images, a broken file extracted over, the file linked (not
copied) into a checkpoint's copy; and a whole run whose resume reads them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import mixem
from mixem import checkpoint as ckpt
from mixem.data import load_images
from mixem.feature_cache import FILE, copy_checkpoint, representation_features


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real one-epoch run (no refinement): its folder and the representation's model."""
    conf = tmp_path_factory.mktemp("conf") / "one.json"
    conf.write_text(json.dumps({"train": {"candidate_crop_scale": None, "refine": False}}))
    out = tmp_path_factory.mktemp("runs") / "run"
    mixem.train(out=out, config=conf, preset="cpu", max_images=200, epochs=1, device="cpu", evaluate=False)
    model, _ = ckpt.load_model(out, device="cpu")
    return out, model


def test_kept_features_are_read_back_bit_for_bit(trained, extractions, tmp_path):
    counted = extractions
    out, model = trained
    images = load_images(None, image_size=28, in_channels=1, max_images=200).images
    folder = ckpt.newest(out, "epoch")
    fresh = representation_features(model, images, out, "cpu", keep=False)
    assert counted == [200] and not (folder / FILE).exists()  # not asked to keep: nothing written
    kept = representation_features(model, images, out, "cpu", keep=True)
    assert counted == [200, 200] and (folder / FILE).is_file()
    again = representation_features(model, images, out, "cpu", keep=False)
    assert counted == [200, 200]  # read, not extracted
    for name in fresh:
        assert np.array_equal(again[name], fresh[name]) and np.array_equal(kept[name], fresh[name]), name

    # A copy of the checkpoint (the draws', OUT's) carries them, linked where the file system allows.
    copy = tmp_path / "copy"
    copy_checkpoint(folder, copy / "checkpoints" / folder.name)
    assert os.stat(copy / "checkpoints" / folder.name / FILE).st_ino == os.stat(folder / FILE).st_ino
    assert np.array_equal(representation_features(model, images, copy, "cpu", keep=False)["probs"], fresh["probs"])
    assert counted == [200, 200]

    # Other images (one pixel changed, or one image fewer) are never served the kept features.
    other = images.clone()
    other[0, 0, 0, 0] ^= 1
    representation_features(model, other, out, "cpu", keep=False)
    representation_features(model, images[:-1], out, "cpu", keep=False)
    assert counted == [200, 200, 200, 199]

    # A broken file (not an npz, or one cut short) is extracted over, and rewritten when keeping.
    whole = (folder / FILE).read_bytes()
    for broken in (b"not an npz", whole[: len(whole) // 2]):
        (folder / FILE).write_bytes(broken)
        assert np.array_equal(
            representation_features(model, images, out, "cpu", keep=True)["embedding"], fresh["embedding"]
        )
        n = len(counted)
        representation_features(model, images, out, "cpu", keep=False)
        assert counted[-1:] == [200] and len(counted) == n  # extracted once, then read
    assert counted == [200, 200, 200, 199, 200, 200]


def test_a_run_that_keeps_its_features_reads_them_when_resumed(tmp_path, extractions):
    """keep_features (what the crop candidates set): the scored run extracts the representation once and keeps
    it; `--resume` of the finished run, scoring again, extracts only the refined model, and scores the same."""
    calls = extractions
    conf = tmp_path / "keep.json"
    conf.write_text(json.dumps({"train": {"candidate_crop_scale": None, "keep_features": True}}))
    run = mixem.train(out=tmp_path / "run", config=conf, preset="cpu", max_images=256, epochs=1, refine_epochs=2,
                      device="cpu")  # fmt: skip
    assert calls == [256, 256] and (tmp_path / "run" / "checkpoints" / "epoch_0001" / FILE).is_file()
    calls.clear()
    again = mixem.train(out=tmp_path / "run", resume=True)
    assert calls == [256]  # the refined model's; the representation's were read
    assert again.metrics["stages"] == run.metrics["stages"] and again.metrics["rows"] == run.metrics["rows"]
