"""Fused NT-Xent: the masked log-sum-exp ("LSE op") of Z Zᵀ/τ in Triton, forward and backward.

Math (M rows in the kernel, M = N = 2B for one matrix; rows are L2-normalised outside the kernel):
    s_ik   = z_i · z_k / τ
    lse_i  = log Σ_{k ≠ i} exp(s_ik)                       (the only O(M²) part of NT-Xent)
    P_ik   = exp(s_ik − lse_i),  P_ii = 0
Gradient for an upstream dlse (M,):
    ∂/∂z_j = (1/τ) Σ_k (dlse_j P_jk + dlse_k P_kj) z_k  =  (1/τ) (W Z)_j,   W_jk = dlse_j P_jk + dlse_k P_kj
The row term (dlse_j P_jk) and the column term (dlse_k P_kj) land in the same output row, so one
row-block kernel with one GEMM computes dZ: no atomics, deterministic.
Distributed (rows R = z_rows, columns C = z_all, row i of R is global row row_offset + i):
    ∂/∂r_i = (1/τ) Σ_k dlse_i P_ik c_k          (row term only, row programs over R)
    ∂/∂c_k = (1/τ) Σ_i dlse_i P_ik r_i          (column term only, row programs over C)
Both are the same kernel with roles swapped, so one backward kernel serves all three cases.

Memory / FLOP accounting, M rows, D dim:
    eager reference: writes S (M², fp32), the masked copy, the softmax for backward and dS: ~4 M² floats
        live at once (4 GiB each at M = 32768) and ~6 passes over M² floats through HBM.
    fused: reads Z per row block (M²D/BM elements, L2-resident), writes lse (M floats); backward
        reads Z, lse, dlse and writes dZ (M·D): O(M·D) memory.
    FLOP: forward 2M²D, backward 4M²D (recompute S + one W·Z GEMM); exps: M² forward, 2M² backward.
Numerics: exp2 with log2(e)/τ folded into one scale; fp32 (fp64 for fp64 inputs) accumulation, max,
sum and lse; fp32 tl.dot with input_precision="ieee" so the GPU matches torch (tf32 would not).
The backward's W is cast to the input dtype for the second GEMM (FlashAttention does the same with P);
dlse is divided by a power of two first so that |W| ≤ 2 stays far from the fp16 subnormals.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from mixem.errors import MixEMError
from mixem.losses import nt_xent_torch

MAX_D = 256  # larger D no longer fits the BM x D register tile of the backward on a GPU
_LOG2E = 1.4426950408889634


@triton.jit
def _ntxent_lse_fwd_kernel(
    A, Bm, LSE,  # (RA, D) rows, (RB, D) columns, (RA,) out
    RA, RB, D, a_off, b_off, stride_a, stride_b,
    scale2,  # log2(e) / τ
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)  # (BM,)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    a = tl.load(A + rows[:, None] * stride_a + offs_d[None, :], mask=(rows[:, None] < RA) & dmask[None, :], other=0.0)
    grow = rows + a_off  # global index of each row: its own column is the masked diagonal
    row_lo = pid * BM + a_off
    m = tl.full((BM,), float("-inf"), ACC)
    l_i = tl.zeros((BM,), ACC)
    for start in range(0, RB, BN):
        cols = start + offs_n  # (BN,)
        b = tl.load(
            Bm + cols[:, None] * stride_b + offs_d[None, :], mask=(cols[:, None] < RB) & dmask[None, :], other=0.0
        )
        x = tl.dot(a, tl.trans(b), input_precision="ieee", out_dtype=ACC) * scale2  # (BM, BN), log2 domain
        gcol_lo = start + b_off
        # Only ragged and diagonal tiles pay for the mask.
        if (start + BN > RB) | ((gcol_lo < row_lo + BM) & (gcol_lo + BN > row_lo)):
            keep = (cols[None, :] < RB) & ((cols[None, :] + b_off) != grow[:, None])
            x = tl.where(keep, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 1))
        # A row with no valid column yet keeps m = -inf; shift by 0 there to avoid (-inf) - (-inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m - m_safe) + tl.sum(tl.exp2(x - m_safe[:, None]), 1)
        m = m_new
    lse = (m + tl.log2(l_i)) * 0.6931471805599453  # natural log
    tl.store(LSE + rows, lse, mask=rows < RA)


@triton.jit
def _ntxent_lse_bwd_kernel(
    A, Bm, DA,  # (RA, D) program rows, (RB, D) looped rows, (RA, D) out
    LSE_A, DLSE_A, LSE_B, DLSE_B,  # (RA,), (RA,), (RB,), (RB,); dlse pre-divided by a power of two
    RA, RB, D, a_off, b_off, stride_a, stride_b, stride_da,
    DSCALE, scale2, inv_tau,  # (1,) the power of two dlse was divided by; log2(e) / τ; 1 / τ
    ROW_TERM: tl.constexpr, COL_TERM: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < RA
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    a = tl.load(A + rows[:, None] * stride_a + offs_d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    grow = rows + a_off
    row_lo = pid * BM + a_off
    if ROW_TERM:
        lse_a = tl.load(LSE_A + rows, mask=rmask, other=0.0).to(ACC) * 1.4426950408889634
        dl_a = tl.load(DLSE_A + rows, mask=rmask, other=0.0).to(ACC)
    acc = tl.zeros((BM, BD), ACC)
    for start in range(0, RB, BN):
        cols = start + offs_n
        cmask = cols < RB
        b = tl.load(Bm + cols[:, None] * stride_b + offs_d[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        x = tl.dot(a, tl.trans(b), input_precision="ieee", out_dtype=ACC) * scale2  # (BM, BN)
        gcol_lo = start + b_off
        if (start + BN > RB) | ((gcol_lo < row_lo + BM) & (gcol_lo + BN > row_lo)):
            keep = cmask[None, :] & ((cols[None, :] + b_off) != grow[:, None])
            x = tl.where(keep, x, float("-inf"))
        w = tl.zeros((BM, BN), ACC)
        if ROW_TERM:
            w += dl_a[:, None] * tl.exp2(x - lse_a[:, None])
        if COL_TERM:
            lse_b = tl.load(LSE_B + cols, mask=cmask, other=0.0).to(ACC) * 1.4426950408889634
            dl_b = tl.load(DLSE_B + cols, mask=cmask, other=0.0).to(ACC)
            w += dl_b[None, :] * tl.exp2(x - lse_b[None, :])
        acc = tl.dot(w.to(b.dtype), b, acc, input_precision="ieee", out_dtype=ACC)  # (BM, BD)
    acc = acc * (tl.load(DSCALE).to(ACC) * inv_tau)
    tl.store(
        DA + rows[:, None] * stride_da + offs_d[None, :],
        acc.to(DA.dtype.element_ty),
        mask=rmask[:, None] & dmask[None, :],
    )


# Fixed when the kernels are defined (TRITON_INTERPRET is read at import, for every kernel of the module alike). A
# constant, not a call: Dynamo traces _check under torch.compile and cannot evaluate isinstance() on a compiled
# Triton kernel (seen on an H200).
INTERPRETING = isinstance(_ntxent_lse_fwd_kernel, InterpretedFunction)


def _on(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check(*zs: torch.Tensor) -> None:
    z = zs[0]
    if z.dim() != 2 or any(t.dim() != 2 or t.shape[1] != z.shape[1] for t in zs):
        raise MixEMError(
            f"the NT-Xent kernel takes (M, D) matrices with the same D, got {[tuple(t.shape) for t in zs]}"
        )
    if any(t.dtype != z.dtype or t.device != z.device for t in zs):
        raise MixEMError("the NT-Xent kernel needs its inputs in one dtype on one device")
    if z.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise MixEMError(f"the NT-Xent kernel takes float16/bfloat16/float32/float64, got {z.dtype}")
    if z.shape[1] > MAX_D:
        raise MixEMError(f"the NT-Xent kernel supports D <= {MAX_D}, got D = {z.shape[1]}; use impl='torch'")
    if max(t.numel() for t in zs) >= 2**31:  # the kernels index with int32
        raise MixEMError(
            f"the NT-Xent kernel takes fewer than 2^31 elements per matrix, got {max(t.numel() for t in zs)}"
        )
    if z.device.type != "cuda" and not INTERPRETING:
        raise MixEMError("Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported")
    if INTERPRETING and z.dtype == torch.bfloat16:
        raise MixEMError(
            "bfloat16 needs a GPU: Triton's CPU interpreter computes bf16 dots wrongly; use float16 or float32"
        )


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _config(RA: int, RB: int, D: int, dtype: torch.dtype, backward: bool, interpret: bool) -> dict:
    """One tile config per shape (no autotune: it needs a GPU driver, and CI has none)."""
    BD = max(16, triton.next_power_of_2(D))
    if interpret:
        # The interpreter costs ~3-4 ms per tile step whatever its size: the biggest tiles are fastest.
        return dict(
            BM=min(128, max(16, triton.next_power_of_2(RA))), BN=min(128, max(16, triton.next_power_of_2(RB))), BD=BD
        )
    if dtype == torch.float64:  # gradcheck-sized problems only; fp64 tiles are 2x the bytes
        return dict(BM=32, BN=32, BD=BD, num_warps=4, num_stages=1)
    # Untuned guesses for Hopper, to be replaced by measurements. Checked by compiling for sm_90
    # (tests/kernels/test_sm90_build.py): wgmma for 16-bit inputs, no register spills, shared memory
    # under 227 KiB. 64-row blocks keep >= 2 waves of programs on 132 SMs up to M = 16384; the
    # backward's BM x BD fp32 accumulator spills at 128 rows unless the inputs are 16-bit.
    half = dtype in (torch.float16, torch.bfloat16)
    big = RA >= 32768 and BD <= 128 and (half or not backward)
    BM = 128 if big else 64
    BN = 64 if BD <= 128 else 32
    warps = 8 if backward or BM * BD >= 128 * 128 else 4
    return dict(BM=BM, BN=BN, BD=BD, num_warps=warps, num_stages=3 if BD <= 128 and not backward else 2)


def _launch(kernel, a: torch.Tensor, b: torch.Tensor, backward: bool, *args, **meta) -> None:
    """One program per BM rows of a (against every row of b), with the tile config for this shape."""
    RA, D = a.shape
    cfg = _config(RA, b.shape[0], D, a.dtype, backward, INTERPRETING)
    acc = tl.float64 if a.dtype == torch.float64 else tl.float32
    with _on(a):
        kernel[(triton.cdiv(RA, cfg["BM"]),)](*args, ACC=acc, **meta, **cfg)


def _launch_fwd(rows: torch.Tensor, cols: torch.Tensor, row_offset: int, tau: float) -> torch.Tensor:
    _check(rows, cols)
    rows, cols = rows.contiguous(), cols.contiguous()
    RA, D = rows.shape
    lse = torch.empty(RA, dtype=_lse_dtype(rows.dtype), device=rows.device)  # (RA,)
    if RA:
        _launch(
            _ntxent_lse_fwd_kernel,
            rows,
            cols,
            False,
            rows,
            cols,
            lse,
            RA,
            cols.shape[0],
            D,
            row_offset,
            0,
            rows.stride(0),
            cols.stride(0),
            _LOG2E / tau,
        )
    return lse


def _launch_bwd(a, b, lse_a, dlse_a, lse_b, dlse_b, dscale, a_off, b_off, tau, row_term, col_term) -> torch.Tensor:
    RA, D = a.shape
    da = torch.empty_like(a)  # (RA, D)
    if RA:
        _launch(
            _ntxent_lse_bwd_kernel,
            a,
            b,
            True,
            a,
            b,
            da,
            lse_a,
            dlse_a,
            lse_b,
            dlse_b,
            RA,
            b.shape[0],
            D,
            a_off,
            b_off,
            a.stride(0),
            b.stride(0),
            da.stride(0),
            dscale,
            _LOG2E / tau,
            1.0 / tau,
            ROW_TERM=row_term,
            COL_TERM=col_term,
        )
    return da


def _scaled(dlse: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dlse / 2^e with |dlse / 2^e| <= 1, and 2^e, as tensors (no host sync, so it compiles)."""
    dlse = dlse.to(lse.dtype).contiguous()
    amax = dlse.abs().max() if dlse.numel() else dlse.new_zeros(())
    scale = torch.exp2(torch.ceil(torch.log2(amax))).where(amax > 0, torch.ones_like(amax)).reshape(1)
    return (dlse / scale).contiguous(), scale


# Single matrix: lse of every row of z against all other rows of z.
@torch.library.custom_op("mixem::ntxent_lse", mutates_args=())
def _ntxent_lse(z: torch.Tensor, tau: float) -> torch.Tensor:
    return _launch_fwd(z, z, 0, tau)


@_ntxent_lse.register_fake
def _(z, tau):
    return z.new_empty(z.shape[0], dtype=_lse_dtype(z.dtype))


@torch.library.custom_op("mixem::ntxent_lse_bwd", mutates_args=())
def _ntxent_lse_bwd(dlse: torch.Tensor, z: torch.Tensor, lse: torch.Tensor, tau: float) -> torch.Tensor:
    z = z.contiguous()
    d, scale = _scaled(dlse, lse)
    return _launch_bwd(z, z, lse, d, lse, d, scale, 0, 0, tau, True, True)


@_ntxent_lse_bwd.register_fake
def _(dlse, z, lse, tau):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _ntxent_lse_setup(ctx, inputs, output):
    z, tau = inputs
    ctx.save_for_backward(z, output)
    ctx.tau = tau


def _ntxent_lse_backward(ctx, dlse):
    z, lse = ctx.saved_tensors
    return _ntxent_lse_bwd(dlse.contiguous(), z, lse, ctx.tau), None


_ntxent_lse.register_autograd(_ntxent_lse_backward, setup_context=_ntxent_lse_setup)


# Rows against gathered columns: the distributed form (rows of this rank vs all ranks' rows).
@torch.library.custom_op("mixem::ntxent_lse_rows", mutates_args=())
def _ntxent_lse_rows(z_rows: torch.Tensor, z_all: torch.Tensor, row_offset: int, tau: float) -> torch.Tensor:
    return _launch_fwd(z_rows, z_all, row_offset, tau)


@_ntxent_lse_rows.register_fake
def _(z_rows, z_all, row_offset, tau):
    return z_rows.new_empty(z_rows.shape[0], dtype=_lse_dtype(z_rows.dtype))


@torch.library.custom_op("mixem::ntxent_lse_rows_bwd", mutates_args=())
def _ntxent_lse_rows_bwd(
    dlse: torch.Tensor, z_rows: torch.Tensor, z_all: torch.Tensor, lse: torch.Tensor, row_offset: int, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    z_rows, z_all = z_rows.contiguous(), z_all.contiguous()
    d, scale = _scaled(dlse, lse)
    d_rows = _launch_bwd(z_rows, z_all, lse, d, lse, d, scale, row_offset, 0, tau, True, False)  # (R, D)
    d_all = _launch_bwd(z_all, z_rows, lse, d, lse, d, scale, 0, row_offset, tau, False, True)  # (M, D)
    return d_rows, d_all


@_ntxent_lse_rows_bwd.register_fake
def _(dlse, z_rows, z_all, lse, row_offset, tau):
    return torch.empty_like(z_rows, memory_format=torch.contiguous_format), torch.empty_like(
        z_all, memory_format=torch.contiguous_format
    )


def _ntxent_lse_rows_setup(ctx, inputs, output):
    z_rows, z_all, row_offset, tau = inputs
    ctx.save_for_backward(z_rows, z_all, output)
    ctx.row_offset, ctx.tau = row_offset, tau


def _ntxent_lse_rows_backward(ctx, dlse):
    z_rows, z_all, lse = ctx.saved_tensors
    d_rows, d_all = _ntxent_lse_rows_bwd(dlse.contiguous(), z_rows, z_all, lse, ctx.row_offset, ctx.tau)
    return d_rows, d_all, None, None


_ntxent_lse_rows.register_autograd(_ntxent_lse_rows_backward, setup_context=_ntxent_lse_rows_setup)


def _tau(tau) -> float:
    # float() of a tensor would silently cut a learnable temperature out of the graph.
    if torch.is_tensor(tau) and tau.requires_grad:
        raise MixEMError("the fused NT-Xent kernel takes a fixed temperature; for a learnable one use impl='torch'")
    return float(tau)


def ntxent_lse_triton(z: torch.Tensor, tau: float) -> torch.Tensor:
    """lse_i = log Σ_{k≠i} exp(z_i·z_k/τ) of one (M, D) matrix, like `ntxent_lse_torch`; (M,) fp32 (fp64 for fp64)."""
    _check(z)
    return _ntxent_lse(z, _tau(tau))


def ntxent_lse_rows_triton(z_rows: torch.Tensor, z_all: torch.Tensor, row_offset: int, tau: float) -> torch.Tensor:
    """lse of each row of z_rows (R, D) against every row of z_all (M, D) except itself; (R,) fp32.

    Row i of z_rows is row row_offset + i of z_all (its diagonal). Gradients flow to both inputs, so
    in data-parallel training gather z_all with an autograd-aware all-gather
    (`torch.distributed.nn.functional.all_gather`): its backward sums every rank's column term into the
    owner's rows. With rows stacked per rank as [view 1; view 2] the positives stay on the rank:
        lse = ntxent_lse_rows_triton(z_local, z_all, rank * len(z_local), tau)
        loss_local = (lse - positive_logits_torch(z_local, tau)).mean()
    ntxent_lse_triton(z, tau) equals ntxent_lse_rows_triton(z, z, 0, tau) at half the backward cost.
    """
    _check(z_rows, z_all)
    if not 0 <= row_offset <= z_all.shape[0] - z_rows.shape[0]:
        raise MixEMError(
            f"row_offset {row_offset} puts {z_rows.shape[0]} rows outside the {z_all.shape[0]} gathered rows"
        )
    return _ntxent_lse_rows(z_rows, z_all, int(row_offset), _tau(tau))


def nt_xent_triton(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """SimCLR NT-Xent (cosine) over the 2B views of B images with the fused LSE; matches `nt_xent_torch`."""
    return nt_xent_torch(z1, z2, tau, lse=ntxent_lse_triton)
