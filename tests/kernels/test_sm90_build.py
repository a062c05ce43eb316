"""The kernels build for an H100 (sm_90) with the launchers' tile configs, checked without a GPU.

The interpreter forgives what the compiler does not (types across branches, shared-memory size,
register pressure), so CI compiles the real kernels too: no register spills, shared memory within
Hopper's 227 KiB, and tensor-core (wgmma) dots for 16-bit inputs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HOPPER_SHARED_BYTES = 227 * 1024


@pytest.fixture(scope="module")
def builds():
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (tools / "ptxas").exists() or not (tools / "cuobjdump").exists():
        pytest.skip(f"Triton's bundled ptxas/cuobjdump not found in {tools}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("_sm90_build.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_every_build_fits_hopper(builds):
    assert len(builds) == 22
    for b in builds:
        assert b["stack"] == 0, f"register spill: {b}"
        assert b["shared"] <= HOPPER_SHARED_BYTES, f"shared memory over 227 KiB: {b}"


def test_16_bit_dots_use_tensor_cores(builds):
    nt = [b for b in builds if b["kernel"].startswith("_ntxent") and b["dtype"] in ("bf16", "fp16")]
    assert nt and all(b["wgmma"] > 0 for b in nt), [b for b in nt if not b["wgmma"]]
