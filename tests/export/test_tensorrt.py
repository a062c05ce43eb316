"""TensorRT: missing-dependency messages and plan compatibility here; build and run where TensorRT and a GPU exist."""

import importlib.util
import json

import pytest
import torch

from mixem.engines import load_engine
from mixem.engines.trt_engine import check_compatible
from mixem.errors import MissingDependencyError, MixEMError
from mixem.export import export_checkpoint
from mixem.export.parity import real_images

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
_missing = [
    m
    for m, ok in (
        ("TensorRT (not installed; pip install --extra-index-url https://pypi.nvidia.com tensorrt)", HAS_TRT),
        ("a CUDA GPU (none visible to PyTorch)", torch.cuda.is_available()),
    )
    if not ok
]
TRT_SKIP = "needs " + " and ".join(_missing)


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown when TensorRT is missing; it is installed here")
def test_trt_without_tensorrt_names_the_install_line(small_ckpt, tmp_path):
    for call in (lambda: export_checkpoint(small_ckpt, "trt", tmp_path), lambda: load_engine(tmp_path, "trt")):
        with pytest.raises(MissingDependencyError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "tensorrt" in msg and "https://pypi.nvidia.com" in msg
    assert list(tmp_path.iterdir()) == []  # refused before exporting anything


SIDE = {"tensorrt": "10.13.0.35", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


@pytest.mark.parametrize(
    "here, refused",
    [
        (dict(SIDE), None),
        (dict(SIDE, gpu="NVIDIA H100 PCIe"), None),  # same architecture: plans are shared
        (dict(SIDE, compute_capability="8.0", gpu="NVIDIA A100-SXM4-80GB"), "GPU compute capability 9.0"),
        (dict(SIDE, tensorrt="11.4.0.106"), "TensorRT version 10.13.0.35"),
    ],
)
def test_plan_compatibility(here, refused):
    if refused is None:
        check_compatible(SIDE, here, "x/model.plan")
        return
    with pytest.raises(MixEMError) as e:
        check_compatible(SIDE, here, "x/model.plan")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("x/model.plan: built for " + refused) and "rebuild it here" in msg


@pytest.mark.trt
@pytest.mark.skipif(bool(_missing), reason=TRT_SKIP)
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_build_and_run_plan(small_ckpt, tmp_path, fp16):
    s = export_checkpoint(small_ckpt, "trt", tmp_path, fp16=fp16, min_batch=1, opt_batch=16, max_batch=64)
    side = json.loads((tmp_path / "model.plan.json").read_text())
    assert s["path"] == str(tmp_path / "model.plan") and side["parity"]["passed"]
    assert side["profile"]["max"] == [64, 1, 28, 28] and side["precision"] == ("fp16" if fp16 else "fp32")
    assert (tmp_path / "timing.cache").stat().st_size > 0
    trt_e, torch_e = load_engine(tmp_path, "trt"), load_engine(small_ckpt, "torch", "cuda", precision="fp32")
    assert trt_e.provider.startswith("TensorRT") and trt_e.device.type == "cuda"
    for batch in (1, 7, 64):
        x = torch.from_numpy(real_images(256, 28, 1)[:batch]).cuda()
        (e, p), (re, rp) = trt_e(x), torch_e(x)
        assert e.dtype == torch.float32 and e.shape == (batch, 32) and p.shape == (batch, 10)
        assert torch.nn.functional.cosine_similarity(e, re).min() >= (0.999 if fp16 else 0.9999)
        torch.testing.assert_close(p, rp, atol=1e-2 if fp16 else 1e-4, rtol=0)  # the mixture probabilities too
    with pytest.raises(MixEMError, match="exceeds this engine's max batch 64"):
        trt_e(torch.zeros(65, 1, 28, 28, dtype=torch.uint8, device="cuda"))
    # A sidecar from another TensorRT version is refused at load time.
    (tmp_path / "model.plan.json").write_text(json.dumps(dict(side, tensorrt="0.0.0")))
    with pytest.raises(MixEMError, match="built for TensorRT version 0.0.0"):
        load_engine(tmp_path, "trt")
