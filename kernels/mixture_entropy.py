"""Fused MIX'EM mixture statistics of gate logits in Triton: softmax, entropies, 1 − max π, batch mean.

Math, gate logits a (B, K), π = softmax(a) per row, log π by log-softmax (no log 0):
    H_i   = −Σ_k π_ik log π_ik                       instance_entropy = (1/B) Σ_i H_i
    x_i   = 1 − π_{i,c_i},  c_i = argmax_k π_ik      pimax = (1/B) Σ_i x_i
    p̄_k   = (1/B) Σ_i π_ik                            marginal_entropy = −Σ_k p̄_k log p̄_k
The kernel outputs π, p̄, instance_entropy and pimax; the O(K) marginal entropy is taken from p̄ in
PyTorch. Gradient: every output is a function of π, so for upstream grads gπ (B, K), gp̄ (K,), gH, gx
    v_ij = gπ_ij + gp̄_j / B − (gH / B) log π_ij − (gx / B) [j = c_i]
    ∂/∂a_ij = π_ij (v_ij − Σ_k π_ik v_ik)
(the constant parts of ∂H/∂π, ∂p̄/∂π cancel in the softmax Jacobian). With gp̄_j = −gH_m (log p̄_j + 1)
this is the marginal term −(gH_m/B) π_ij [log p̄_j − Σ_k π_ik log p̄_k]; with gx it is
−(gx/B) π_ic (δ_jc − π_ij), the gradient through the argmax element only.

Memory / FLOP accounting, B rows, K components:
    eager reference: log_softmax, exp, mean, max, two products and sums, each a pass over B·K
        (read ~8 BK, write ~5 BK floats forward, about as much again in backward).
    fused: forward reads BK logits, writes BK π (an output) + ⌈B/BB⌉·K partial sums of π;
        backward reads BK logits + BK gπ, writes BK grads. ~10 FLOP + 1 exp + 1 log per element.
Two phases: each program writes the partial sums of its BB rows, PyTorch adds the ⌈B/BB⌉ partials
(deterministic, no atomics). O(B·K) work: this kernel saves passes, not asymptotic cost.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from mixem.errors import MixEMError

MAX_K = 16384  # one row of K logits is held in registers


@triton.jit
def _mixture_fwd_kernel(
    A, PI, PART,  # (B, K) logits, (B, K) out π, (programs, K + 2) out: Σ_i π_i, Σ_i H_i, Σ_i x_i
    B, K, stride_a, stride_pi,
    BB: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BB + tl.arange(0, BB)  # (BB,)
    cols = tl.arange(0, BK)
    rmask = rows < B
    mask = rmask[:, None] & (cols[None, :] < K)
    a = tl.load(A + rows[:, None] * stride_a + cols[None, :], mask=mask, other=float("-inf")).to(ACC)
    # Padded rows are all -inf: shift them by 0 so they give 0/0-free zeros, masked below.
    m = tl.max(a, 1)
    m = tl.where(rmask, m, 0.0)
    e = tl.exp(a - m[:, None])
    s = tl.sum(e, 1)
    s = tl.where(rmask, s, 1.0)
    logp = tl.where(mask, a - m[:, None] - tl.log(s)[:, None], 0.0)  # (BB, BK)
    pi = tl.where(mask, e / s[:, None], 0.0)
    tl.store(PI + rows[:, None] * stride_pi + cols[None, :], pi.to(PI.dtype.element_ty), mask=mask)
    h = -tl.sum(pi * logp, 1)  # (BB,)
    x = tl.where(rmask, 1.0 - tl.max(pi, 1), 0.0)
    out = PART + pid * (K + 2)
    tl.store(out + cols, tl.sum(pi, 0), mask=cols < K)
    tl.store(out + K, tl.sum(h, 0))
    tl.store(out + K + 1, tl.sum(x, 0))


@triton.jit
def _mixture_bwd_kernel(
    A, GPI, GPBAR, GSTAT, DA,  # (B, K) logits, (B, K) grad of π, (K,) grad of p̄, (2,) grads of H and x, (B, K) out
    B, K, stride_a, stride_g, stride_da, inv_b,
    BB: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BB + tl.arange(0, BB)
    cols = tl.arange(0, BK)
    rmask = rows < B
    cmask = cols < K
    mask = rmask[:, None] & cmask[None, :]
    a = tl.load(A + rows[:, None] * stride_a + cols[None, :], mask=mask, other=float("-inf")).to(ACC)
    m = tl.where(rmask, tl.max(a, 1), 0.0)
    e = tl.exp(a - m[:, None])
    s = tl.where(rmask, tl.sum(e, 1), 1.0)
    logp = tl.where(mask, a - m[:, None] - tl.log(s)[:, None], 0.0)
    pi = tl.where(mask, e / s[:, None], 0.0)
    # Same tie rule as the forward's max: the first maximal column gets the pimax gradient.
    c = tl.argmax(pi, 1, tie_break_left=True)  # (BB,)
    g_h = tl.load(GSTAT).to(ACC) * inv_b
    g_x = tl.load(GSTAT + 1).to(ACC) * inv_b
    v = tl.load(GPI + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(ACC)
    v += tl.load(GPBAR + cols, mask=cmask, other=0.0).to(ACC)[None, :] * inv_b
    v -= g_h * logp
    v -= tl.where(cols[None, :] == c[:, None], g_x, 0.0)
    da = pi * (v - tl.sum(pi * v, 1)[:, None])
    tl.store(DA + rows[:, None] * stride_da + cols[None, :], da.to(DA.dtype.element_ty), mask=mask)


# Fixed when the kernels are defined (TRITON_INTERPRET is read at import). A constant, not a call: Dynamo traces
# _check under torch.compile and cannot evaluate isinstance() on a compiled Triton kernel (seen on an H200).
INTERPRETING = isinstance(_mixture_fwd_kernel, InterpretedFunction)


def _on(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _config(B: int, K: int) -> dict:
    BK = max(16, triton.next_power_of_2(K))
    # ~4096 elements per program: enough rows to amortise the launch, few enough to stay in registers.
    BB = max(1, min(64, 4096 // BK, triton.next_power_of_2(B)))
    return dict(BB=BB, BK=BK, num_warps=4 if BB * BK <= 4096 else 8)


def _check(logits: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise MixEMError(f"the mixture kernel takes gate logits (B, K) with B >= 1, got {tuple(logits.shape)}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise MixEMError(f"the mixture kernel takes float16/bfloat16/float32/float64, got {logits.dtype}")
    if logits.shape[1] > MAX_K:
        raise MixEMError(f"the mixture kernel supports K <= {MAX_K}, got K = {logits.shape[1]}; use impl='torch'")
    if logits.numel() >= 2**31:  # the kernels index with int32
        raise MixEMError(f"the mixture kernel takes fewer than 2^31 logits, got {logits.numel()}")
    if logits.device.type != "cuda" and not INTERPRETING:
        raise MixEMError("Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported")
    if INTERPRETING and logits.dtype == torch.bfloat16:
        raise MixEMError("bfloat16 needs a GPU: Triton's CPU interpreter computes bf16 wrongly; use float16 or float32")


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@torch.library.custom_op("mixem::mixture_stats", mutates_args=())
def _mixture_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = logits.contiguous()
    B, K = logits.shape
    cfg = _config(B, K)
    grid = triton.cdiv(B, cfg["BB"])
    dt = _out_dtype(logits.dtype)
    pi = torch.empty(B, K, dtype=dt, device=logits.device)  # (B, K)
    part = torch.empty(grid, K + 2, dtype=dt, device=logits.device)  # (programs, K + 2)
    with _on(logits):
        _mixture_fwd_kernel[(grid,)](
            logits, pi, part, B, K, logits.stride(0), pi.stride(0), ACC=_acc(logits.dtype), **cfg
        )
    tot = part.sum(0) / B  # (K + 2,)
    return pi, tot[:K].clone(), tot[K].clone(), tot[K + 1].clone()


@_mixture_stats.register_fake
def _(logits):
    B, K = logits.shape
    dt = _out_dtype(logits.dtype)
    return (
        logits.new_empty(B, K, dtype=dt),
        logits.new_empty(K, dtype=dt),
        logits.new_empty((), dtype=dt),
        logits.new_empty((), dtype=dt),
    )


@torch.library.custom_op("mixem::mixture_stats_bwd", mutates_args=())
def _mixture_stats_bwd(
    logits: torch.Tensor, g_pi: torch.Tensor, g_pbar: torch.Tensor, g_stats: torch.Tensor
) -> torch.Tensor:
    logits, g_pi, g_pbar, g_stats = (t.contiguous() for t in (logits, g_pi, g_pbar, g_stats))
    B, K = logits.shape
    cfg = _config(B, K)
    da = torch.empty_like(logits)  # (B, K)
    with _on(logits):
        _mixture_bwd_kernel[(triton.cdiv(B, cfg["BB"]),)](
            logits,
            g_pi,
            g_pbar,
            g_stats,
            da,
            B,
            K,
            logits.stride(0),
            g_pi.stride(0),
            da.stride(0),
            1.0 / B,
            ACC=_acc(logits.dtype),
            **cfg,
        )
    return da


@_mixture_stats_bwd.register_fake
def _(logits, g_pi, g_pbar, g_stats):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, g_pi, g_pbar, g_h, g_x):
    (logits,) = ctx.saved_tensors
    B, K = logits.shape
    dt = _out_dtype(logits.dtype)
    # Unused outputs arrive as None; the kernel takes zeros instead (O(B K), cheap next to the model).
    g_pi = logits.new_zeros(B, K, dtype=dt) if g_pi is None else g_pi.to(dt)
    g_pbar = logits.new_zeros(K, dtype=dt) if g_pbar is None else g_pbar.to(dt)
    zero = logits.new_zeros((), dtype=dt)
    g_stats = torch.stack([zero if g_h is None else g_h.to(dt), zero if g_x is None else g_x.to(dt)])  # (2,)
    return _mixture_stats_bwd(logits, g_pi, g_pbar, g_stats)


_mixture_stats.register_autograd(_backward, setup_context=_setup)


def mixture_terms_triton(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Same keys and values as `mixture_terms_torch`: marginal_entropy, instance_entropy, pimax, pi (B, K)."""
    _check(logits)
    pi, pbar, instance, pimax = _mixture_stats(logits)
    marginal = -(pbar * torch.log(pbar.clamp_min(torch.finfo(pbar.dtype).tiny))).sum()
    return {"marginal_entropy": marginal, "instance_entropy": instance, "pimax": pimax, "pi": pi}
