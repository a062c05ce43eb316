"""Kernel-test helpers: the tolerance table by dtype, in one place."""

import pytest
import torch

# fp32/fp64: the kernel against a float64 reference on the same inputs.
# fp16/bf16 (flash-attn rule): the kernel's max error against the float64 reference may be at most
# `factor` x PyTorch's own max error in that dtype, plus atol scaled by the largest reference value.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(factor=2.0, atol=1e-3),
    torch.bfloat16: dict(factor=2.0, atol=1e-2),
}


def _assert_close(out, ref_hi, ref_lowp=None, dtype=torch.float32, what="value", scale=None, exact_inputs=False):
    """out: the kernel's result; ref_hi: the reference in float64; ref_lowp: the reference run in `dtype`.

    scale: the size of the terms that were summed into ref_hi when they cancel (default: |ref_hi| max).
    exact_inputs: a forward output whose fp16 inputs reach the kernel unrounded and are accumulated in
    fp32, so it must meet the fp32 rule. (The torch "fp16" reference upcasts to fp32 too, so the
    flash-attn rule would allow ~1e-3 there: thousands of times the kernel's real error.)
    """
    if exact_inputs and dtype == torch.float16:
        dtype = torch.float32
    assert out.shape == ref_hi.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref_hi.shape)}"
    out, ref_hi = out.detach().double(), ref_hi.detach().double()
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    tol = TOL[dtype]
    if "rtol" in tol:
        torch.testing.assert_close(out, ref_hi, atol=tol["atol"], rtol=tol["rtol"], msg=lambda m: f"{what}: {m}")
        return
    err = (out - ref_hi).abs().max().item()
    torch_err = (ref_lowp.detach().double() - ref_hi).abs().max().item()
    scale = ref_hi.abs().max().item() if scale is None else max(scale, ref_hi.abs().max().item())
    bound = tol["factor"] * torch_err + tol["atol"] * max(1.0, scale)
    assert err <= bound, (
        f"{what}: error {err:.3g} > {tol['factor']} x torch's {dtype} error {torch_err:.3g} + atol (bound {bound:.3g})"
    )


@pytest.fixture
def assert_close():
    return _assert_close
