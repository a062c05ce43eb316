"""load_engine: torch and onnx engines agree, report what they run on, and refuse bad input in one line."""

import numpy as np
import pytest
import torch

from mixem.engines import Engine, load_engine
from mixem.errors import ConfigError, DataError, MissingDependencyError
from mixem.export.parity import real_images


@pytest.fixture(scope="module")
def engines(small_ckpt, onnx_fp32):
    out, _ = onnx_fp32
    return load_engine(small_ckpt, "torch", "cpu"), load_engine(out, "onnx", "cpu")


def test_torch_and_onnx_return_the_same_numbers(engines):
    t, o = engines
    x = real_images(256, 28, 1)[-57:]  # odd batch
    (te, tp), (oe, op) = t(x), o(torch.from_numpy(x))
    for a in (te, tp, oe, op):
        assert a.dtype == torch.float32 and a.device.type == "cpu"
    torch.testing.assert_close(oe, te, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(op, tp, atol=1e-5, rtol=1e-4)
    assert torch.equal(op.argmax(1), tp.argmax(1))
    torch.testing.assert_close(te.norm(dim=1), torch.ones(57))


def test_batches_below_min_batch_are_padded(small_ckpt, onnx_fp32):
    """A TensorRT plan built with --min-batch 16 still takes a shard's 3-image tail or a 1-image search query:
    the engine pads with zero images and returns only the real rows, the same numbers as unpadded."""
    x = real_images(64, 28, 1)[-3:]
    for name, path in (("torch", small_ckpt), ("onnx", onnx_fp32[0])):
        plain, padded = load_engine(path, name, "cpu"), load_engine(path, name, "cpu")
        padded.min_batch = 16
        seen = []
        run = padded._run
        padded._run = lambda b, run=run, seen=seen: seen.append(b.shape[0]) or run(b)
        for a, b in zip(plain(x), padded(torch.from_numpy(x))):
            assert b.shape[0] == 3
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
        padded(x)  # numpy input pads too
        assert seen == [16, 16]


def test_engine_metadata(engines, onnx_fp32):
    t, o = engines
    assert isinstance(t, Engine) and isinstance(o, Engine)
    assert (t.name, o.name) == ("torch", "onnx")
    assert (t.image_size, t.in_channels) == (o.image_size, o.in_channels) == (28, 1)
    assert str(t.device) == str(o.device) == "cpu"
    assert t.provider == "eager/fp32"
    assert o.provider == "CPUExecutionProvider"  # onnxruntime-gpu is not installed here
    assert o.outputs == ("embedding", "mixture_probs")
    # A .onnx file works as well as the export directory.
    assert load_engine(onnx_fp32[0] / "model.onnx", "onnx", "cpu").outputs == o.outputs


def test_features_output(small_ckpt):
    e = load_engine(small_ckpt, "torch", "cpu", features=True)
    emb, probs, feats = e(real_images(8, 28, 1))
    assert e.outputs == ("embedding", "mixture_probs", "features")
    assert emb.shape == (8, 32) and probs.shape == (8, 10) and feats.shape == (8, 64)


BAD = [
    (np.zeros((2, 1, 28, 28), np.float32), "got float32 (2, 1, 28, 28)"),
    (torch.zeros(2, 1, 28, 28), "got float32 (2, 1, 28, 28)"),
    (torch.zeros(2, 3, 28, 28, dtype=torch.uint8), "got uint8 (2, 3, 28, 28)"),
    (torch.zeros(2, 1, 32, 32, dtype=torch.uint8), "got uint8 (2, 1, 32, 32)"),
    (torch.zeros(1, 28, 28, dtype=torch.uint8), "got uint8 (1, 28, 28)"),
    (torch.zeros(2, 28, 28, 1, dtype=torch.uint8), "got uint8 (2, 28, 28, 1)"),  # NHWC
    (torch.zeros(0, 1, 28, 28, dtype=torch.uint8), "got uint8 (0, 1, 28, 28)"),
    ([[0]], "got list"),
]


@pytest.mark.parametrize("which", [0, 1], ids=["torch", "onnx"])
@pytest.mark.parametrize("x, got", BAD, ids=[b[1] for b in BAD])
def test_bad_input_is_one_line(engines, which, x, got):
    e = engines[which]
    with pytest.raises(DataError) as err:
        e(x)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{e.name} engine: expected") and got in msg
    assert "uint8 (B, 1, 28, 28)" in msg


def test_bad_engine_and_paths(small_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="unknown engine 'tvm'"):
        load_engine(small_ckpt, "tvm")
    with pytest.raises(DataError, match="no ONNX model here"):
        load_engine(tmp_path, "onnx", "cpu")
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        load_engine(small_ckpt, "torch", "cpu", precision="fp16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message; this machine has a GPU")
def test_onnx_on_cuda_without_gpu_is_refused(onnx_fp32):
    with pytest.raises((ConfigError, MissingDependencyError)) as e:
        load_engine(onnx_fp32[0], "onnx", "cuda")
    assert "\n" not in str(e.value)
