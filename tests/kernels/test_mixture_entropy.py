"""The fused mixture statistics against mixture_terms_torch (interpreter on CPU, compiled on GPU)."""

import math

import pytest
import torch

from mixem.errors import MixEMError
from mixem.kernels import mixture_terms_triton
from mixem.losses import max_entropy, mixture_terms_torch

HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
KEYS = ("marginal_entropy", "instance_entropy", "pimax", "pi")


def _terms_and_grad(fn, logits, grads):
    """All four outputs with a random upstream gradient on each, and the gradient of the logits."""
    a = logits.detach().clone().requires_grad_()
    out = fn(a)
    assert set(out) == set(KEYS)
    sum((out[k] * grads[k].to(out[k].dtype)).sum() for k in KEYS).backward()
    return out, a.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [2, 10, 33])
@pytest.mark.parametrize("B", [1, 7, 130])
@pytest.mark.parametrize("spread", [1.0, 8.0])
def test_matches_reference(B, K, spread, dtype, device, assert_close):
    logits = (spread * torch.randn(B, K, device=device)).to(dtype)  # (B, K); spread 8: near one-hot rows
    grads = {k: torch.randn((B, K) if k == "pi" else (), device=device) for k in KEYS}
    out, da = _terms_and_grad(mixture_terms_triton, logits, grads)
    ref, ref_da = _terms_and_grad(mixture_terms_torch, logits.double(), grads)
    low, low_da = _terms_and_grad(mixture_terms_torch, logits, grads)
    for k in KEYS:
        assert out[k].dtype == low[k].dtype, k
        assert_close(out[k], ref[k], low[k], dtype, k, exact_inputs=True)
    assert da.dtype == dtype
    assert_close(da, ref_da, low_da, dtype, "d/dlogits")


@pytest.mark.parametrize("key", KEYS)
def test_each_output_alone_gets_the_right_gradient(key, device, assert_close):
    """Unused outputs reach the backward as None; each term's gradient must still be exact on its own."""
    logits = 3 * torch.randn(37, 10, device=device)
    weight = torch.randn(37, 10, device=device) if key == "pi" else torch.tensor(1.7, device=device)

    def grad(fn, a):
        a = a.clone().requires_grad_()
        (fn(a)[key] * weight.to(a.dtype)).sum().backward()
        return a.grad

    assert_close(grad(mixture_terms_triton, logits), grad(mixture_terms_torch, logits.double()), what=key)


def test_gradcheck_float64(device):
    a = torch.randn(7, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: tuple(mixture_terms_triton(t).values()), (a,), fast_mode=True)


def test_known_values(device):
    """Uniform logits: every entropy is log K and 1 − max π = 1 − 1/K; a confident balanced batch: H_m = log K."""
    K = 10
    out = mixture_terms_triton(torch.zeros(7, K, device=device))
    torch.testing.assert_close(out["marginal_entropy"].item(), max_entropy(K), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["instance_entropy"].item(), math.log(K), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["pimax"].item(), 1 - 1 / K, rtol=1e-6, atol=1e-6)
    confident = mixture_terms_triton(60 * torch.eye(K, device=device))
    torch.testing.assert_close(confident["marginal_entropy"].item(), math.log(K), rtol=1e-5, atol=1e-5)
    assert confident["instance_entropy"].item() < 1e-20 and confident["pimax"].item() < 1e-20


def test_equivariant_under_batch_permutation(device):
    logits = 2 * torch.randn(130, 33, device=device)
    perm = torch.randperm(130, device=device)
    a, b = mixture_terms_triton(logits), mixture_terms_triton(logits[perm])
    for k in ("marginal_entropy", "instance_entropy", "pimax"):
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a["pi"][perm], b["pi"])


def test_finite_with_extreme_logits(device):
    """Logits 1e4 apart: π underflows to exact zeros, log π must come from the log-softmax, not log 0."""
    logits = torch.tensor([[1e4, 0.0, -1e4], [0.0, 0.0, 0.0]], device=device).requires_grad_()
    out = mixture_terms_triton(logits)
    sum(v.sum() for v in out.values()).backward()
    assert all(torch.isfinite(v).all() for v in out.values()) and torch.isfinite(logits.grad).all()


def test_opcheck(device):
    a = torch.randn(37, 10, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.mixem.mixture_stats.default, (a,))
    args = (
        a.detach(),
        torch.randn(37, 10, device=device),
        torch.randn(10, device=device),
        torch.randn(2, device=device),
    )
    torch.library.opcheck(torch.ops.mixem.mixture_stats_bwd.default, args)


def test_torch_compile(device):
    logits = torch.randn(37, 10, device=device)
    compiled = torch.compile(
        mixture_terms_triton, backend="aot_eager" if device.type == "cpu" else "inductor", fullgraph=True
    )

    def run(fn):
        a = logits.clone().requires_grad_()
        out = fn(a)
        (out["marginal_entropy"] - 0.5 * out["instance_entropy"] + out["pimax"]).backward()
        return out, a.grad

    (out, g), (ref, ref_g) = run(compiled), run(mixture_terms_triton)
    for k in KEYS:
        torch.testing.assert_close(out[k], ref[k])
    torch.testing.assert_close(g, ref_g)


def test_errors_are_one_line_mixem_errors(device):
    with pytest.raises(MixEMError, match="B >= 1"):
        mixture_terms_triton(torch.randn(0, 4, device=device))
    with pytest.raises(MixEMError, match="gate logits"):
        mixture_terms_triton(torch.randn(4, device=device))


@pytest.mark.skipif(HAS_CUDA, reason="the bf16 refusal is for the CPU interpreter only")
def test_bf16_in_interpreter_says_it_needs_a_gpu():
    with pytest.raises(MixEMError, match="bfloat16 needs a GPU"):
        mixture_terms_triton(torch.randn(4, 3, dtype=torch.bfloat16))
