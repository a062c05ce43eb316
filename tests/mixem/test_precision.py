"""precision "auto": bf16 autocast where the device computes bf16 natively, fp32 elsewhere; explicit values win."""

import pytest
import torch

from mixem.config import TrainConfig
from mixem.runtime import native_bf16
from mixem.training import autocast_for, uses_bf16

CPU = torch.device("cpu")


@pytest.mark.parametrize("avx512_bf16, amx, native", [(False, False, False), (True, False, True), (False, True, True)])
def test_auto_follows_the_cpu_probes(monkeypatch, avx512_bf16, amx, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert native_bf16(CPU) is native
    assert uses_bf16(TrainConfig(), CPU) is native
    assert uses_bf16(TrainConfig(precision="fp32"), CPU) is False
    assert uses_bf16(TrainConfig(precision="bf16"), CPU) is True
    ctx = autocast_for(TrainConfig(), CPU)
    with ctx:
        y = torch.ones(4, 4) @ torch.ones(4, 4)
    assert y.dtype == (torch.bfloat16 if native else torch.float32)


def test_a_missing_probe_means_fp32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert native_bf16(CPU) is False


def test_cuda_is_native():
    assert native_bf16(torch.device("cuda")) is True  # a device object needs no GPU
