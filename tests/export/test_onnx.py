"""ONNX export: graph contract, checker, dynamic batch, parity gates, fp16, refusal of bad models."""

import json

import numpy as np
import onnx
import pytest
from export_helpers import RESNET, SMALL, make_checkpoint

from mixem.errors import ConfigError, MixEMError
from mixem.export import export_checkpoint, export_onnx
from mixem.export import onnx as onnx_export
from mixem.export.parity import real_images


def test_graph_contract_and_checker(onnx_fp32):
    out, summary = onnx_fp32
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == onnx_export.OPSET == summary["opset"]
    (inp,) = model.graph.input
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert [o.name for o in model.graph.output] == ["embedding", "mixture_probs"]
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)
    assert summary["outputs"]["embedding"]["shape"] == ["batch", 32]
    assert summary["outputs"]["mixture_probs"]["shape"] == ["batch", 10]
    # Everything the CLI prints must be JSON, and export.json / config.json sit beside the model.
    assert json.loads((out / "export.json").read_text()) == json.loads(json.dumps(summary))
    assert json.loads((out / "config.json").read_text())["backbone"] == "convnet"


def test_parity_report_fp32(onnx_fp32):
    out, summary = onnx_fp32
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and report["precision"] == "fp32" and report["images"] == 256
    assert {1, 7, 64} <= set(report["batch_sizes"])  # the check itself ran the dynamic axis
    assert report["min_cosine"] >= 0.9999 and report["max_prob_error"] <= 1e-4
    assert report["argmax_agreement"] == 1.0
    assert summary["parity"]["min_cosine"] == report["min_cosine"]


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_dynamic_batch_matches_pytorch(onnx_fp32, small_ckpt, batch):
    from mixem.checkpoint import load_model

    out, _ = onnx_fp32
    model, cfg = load_model(small_ckpt)
    x = real_images(256, 28, 1)[100 : 100 + batch]  # images the export check did not start with
    emb, probs = onnx_export.ort_runner(out / "model.onnx")(x)
    ref_emb, ref_probs = (t.numpy() for t in onnx_export.onnx_reference(model)(x))
    assert emb.shape == (batch, 32) and probs.shape == (batch, 10)
    cos = (emb * ref_emb).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref_emb, axis=1)
    assert cos.min() >= 0.9999
    np.testing.assert_allclose(probs, ref_probs, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(1), ref_probs.argmax(1))


def test_fp16_with_features(small_ckpt, tmp_path):
    """fp16 weights/compute, uint8 in, fp32 out; onnxruntime's CPU provider runs it (casting
    unsupported fp16 nodes back to fp32), so parity is measured here, not only on a GPU."""
    s = export_onnx(small_ckpt, tmp_path, fp16=True, features=True)
    model = onnx.load(str(tmp_path / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    weights = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights if len(t.dims) > 1)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in model.graph.output] == ["embedding", "mixture_probs", "features"]
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)
    assert s["outputs"]["features"]["shape"] == ["batch", 64]  # convnet width 16 -> F = 4 * 16
    report = json.loads((tmp_path / "parity.json").read_text())
    # Observed: min cosine 0.999995, max prob error 1.3e-3, argmax agreement 0.996 (one near-tie flips).
    assert report["passed"] and report["precision"] == "fp16" and {1, 7, 64} <= set(report["batch_sizes"])
    assert report["min_cosine"] >= 0.999 and report["max_prob_error"] <= 1e-2
    assert report["min_cosine"] < 1 - 1e-9  # really fp16: an fp32 graph agrees to ~1e-12
    assert report["argmax_agreement"] >= 0.98


def test_too_strict_threshold_is_refused(small_ckpt, tmp_path):
    with pytest.raises(MixEMError) as e:
        export_onnx(small_ckpt, tmp_path, max_prob_error=0.0, min_cosine=1.5)
    msg = str(e.value)
    assert "\n" not in msg and "failed parity" in msg and "was not written" in msg
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / "parity.json").exists()
    assert json.loads((tmp_path / "parity_failed.json").read_text())["passed"] is False
    # No temp file left; the lock file names the folder's last owner (mixem.owner), it stays.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".mixem.lock"]


def test_corrupted_weights_are_refused(onnx_fp32, small_ckpt, tmp_path, monkeypatch):
    """The exporter's graph is swapped for one with one conv weight scaled, as a broken export would be."""
    out, _ = onnx_fp32
    bad = onnx.load(str(out / "model.onnx"))
    conv = next(t for t in bad.graph.initializer if len(t.dims) == 4)
    w = onnx.numpy_helper.to_array(conv).copy()
    w[: w.shape[0] // 2] *= 1.5
    conv.CopyFrom(onnx.numpy_helper.from_array(w, conv.name))
    monkeypatch.setattr(onnx_export, "export_graph", lambda *a, **k: bad)
    (tmp_path / "model.onnx").write_bytes(b"previous export")
    with pytest.raises(MixEMError, match="failed parity") as e:
        export_onnx(small_ckpt, tmp_path)
    assert "\n" not in str(e.value)
    assert (tmp_path / "model.onnx").read_bytes() == b"previous export"  # left untouched


def test_resnet18_graph(tmp_path):
    ckpt = make_checkpoint(tmp_path / "r18", **RESNET)
    s = export_checkpoint(ckpt, "onnx", tmp_path / "out")
    assert s["inputs"]["images"]["shape"] == ["batch", 3, 32, 32]
    # Observed: min cosine 1 - 4e-11, max prob error 2.9e-6.
    assert s["parity"]["passed"] and s["parity"]["min_cosine"] >= 0.9999 and s["parity"]["max_prob_error"] <= 1e-4


def test_cell_pool_graph(tmp_path):
    """The cpu preset's 2 x 2 pool of a 7 x 7 map (overlapping cells) exports, and matches PyTorch on real images."""
    ckpt = make_checkpoint(tmp_path / "pool2", **SMALL, pool=2)
    s = export_checkpoint(ckpt, "onnx", tmp_path / "out")
    # Observed: min cosine 1 - 4e-12, max prob error 1.0e-6.
    assert s["parity"]["passed"] and s["parity"]["min_cosine"] >= 0.9999 and s["parity"]["max_prob_error"] <= 1e-4


def test_unknown_format_and_missing_checkpoint(tmp_path, small_ckpt):
    with pytest.raises(ConfigError, match="unknown export format 'tflite'"):
        export_checkpoint(small_ckpt, "tflite", tmp_path)
    with pytest.raises(MixEMError, match="checkpoint not found"):
        export_checkpoint(tmp_path / "nope", "onnx", tmp_path)
