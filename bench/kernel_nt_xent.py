"""Benchmark of the NT-Xent LSE op: fused Triton vs the eager reference vs the torch.compiled reference.

The op is lse_i = log Σ_{k≠i} exp(z_i·z_k/τ) over M L2-normalised rows of dim D, the only O(M²) part of
NT-Xent (the positive logits and the mean are O(M·D) PyTorch around it). Phases: fwd, bwd (the
gradient of a random upstream dlse, the graph kept from one forward) and fwd+bwd. Peak memory per
candidate comes from the harness. Ideal work (kernels/nt_xent.py): fwd 2M²D FLOP and M² exps, bwd
4M²D FLOP and 2M² exps; ideal bytes read Z, lse, dlse and write lse / dZ once.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from mixem.losses import ntxent_lse_torch

NAME = "kernel_nt_xent"
TAU = 0.1
PHASES = ("fwd", "bwd", "fwd+bwd")


def cases(quick: bool) -> list[dict]:
    if quick:  # the CPU interpreter: a few tile steps each, a smoke test of the whole pipeline
        return [{"M": M, "D": D, "dtype": "float32", "phase": p} for M, D in ((64, 32), (256, 128)) for p in PHASES]
    return [
        {"M": M, "D": D, "dtype": dt, "phase": p}
        for dt in ("bfloat16", "float32")
        for D in (32, 128)
        for M in (4096, 16384, 32768, 65536, 131072, 262144)
        for p in PHASES
    ]


@functools.cache
def _compiled():
    from mixem.bench.harness import compile_for_shapes

    return compile_for_shapes(ntxent_lse_torch)


def setup(case: dict, device: torch.device) -> dict:
    from mixem.kernels import ntxent_lse_triton

    M, D, dtype = case["M"], case["D"], getattr(torch, case["dtype"])
    z = F.normalize(torch.randn(M, D, device=device), dim=1).to(dtype).requires_grad_()  # (M, D)
    g = torch.randn(M, device=device)  # (M,) upstream gradient
    ops = {"torch": ntxent_lse_torch, "torch.compile": _compiled(), "triton": ntxent_lse_triton}
    return {name: _phase(case["phase"], op, z, g) for name, op in ops.items()}


def _phase(phase: str, op, z: torch.Tensor, g: torch.Tensor):
    if phase == "fwd":

        def fwd():
            with torch.no_grad():
                return op(z, TAU)

        return fwd
    if phase == "fwd+bwd":
        return lambda: torch.autograd.grad(op(z, TAU), z, g)[0]
    graph = {}

    def bwd():
        # The forward runs once, on first use, so that setup itself never runs out of memory.
        if "lse" not in graph:
            graph["lse"] = op(z, TAU)
        return torch.autograd.grad(graph["lse"], z, g, retain_graph=True)[0]

    return bwd


def check(case: dict, candidates: dict) -> dict:
    """Triton against the eager reference on the same inputs (skipped by the harness when eager is OOM)."""
    ref = candidates["torch"]().double()
    out = candidates["triton"]().double()
    err = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    # bf16 inputs: the eager reference computes in fp32 from the same bf16 rows; the kernel rounds W to
    # bf16 in backward (FlashAttention does the same with P), ~3 significant digits.
    rtol = 2e-2 if case["dtype"] == "bfloat16" else 1e-4
    assert err <= rtol * max(1.0, scale), f"max error {err:.3g} vs scale {scale:.3g} (rtol {rtol})"
    return {"max_abs_err": err, "ref_scale": scale}


def work(case: dict) -> dict:
    M, D = case["M"], case["D"]
    es = torch.finfo(getattr(torch, case["dtype"])).bits // 8
    fwd = {"flop": 2 * M * M * D, "exp": M * M, "bytes": M * D * es + 4 * M}
    bwd = {"flop": 4 * M * M * D, "exp": 2 * M * M, "bytes": 2 * M * D * es + 8 * M}
    if case["phase"] == "fwd":
        return fwd
    if case["phase"] == "bwd":
        return bwd
    return {k: fwd[k] + bwd[k] for k in fwd}


def not_measured(device: torch.device) -> list[str]:
    out = [
        "symmetric upper-triangle variant (4M²D FLOP, M² exps): not written; it waits for GPU "
        "measurements showing the row-block kernel is exp-bound"
    ]
    if device.type != "cuda":
        out.append(
            "bfloat16 cases and the GPU case grid (M 4096..262144): need a GPU (bf16 is wrong in the interpreter)"
        )
    return out
