"""Session fixtures for the export tests: a small real checkpoint and its fp32 export (seconds each)."""

import pytest
from export_helpers import SMALL, make_checkpoint


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "small", **SMALL)


@pytest.fixture(scope="session")
def onnx_fp32(small_ckpt, tmp_path_factory):
    """(export dir, summary) of the small checkpoint exported in fp32."""
    from mixem.export import export_checkpoint

    out = tmp_path_factory.mktemp("onnx_fp32")
    return out, export_checkpoint(small_ckpt, "onnx", out)
