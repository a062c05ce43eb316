"""Benchmark of the MIX'EM mixture statistics: fused Triton vs the eager and torch.compiled reference.

One call returns the marginal entropy, the instance entropy, 1 − max π and π from gate logits (B, K).
Phases: fwd (no graph) and fwd+bwd (a weighted sum of the three scalars, as the objective uses them).
The work is O(B·K) and memory-bound: ideal bytes read the logits once and write π once (forward), and
read the logits and write their gradient once (backward); ~10 FLOP and one exp per element each way.
"""

from __future__ import annotations

import functools

import torch

from mixem.losses import mixture_terms_torch

NAME = "kernel_mixture_entropy"
PHASES = ("fwd", "fwd+bwd")


def cases(quick: bool) -> list[dict]:
    if quick:
        return [{"B": B, "K": K, "dtype": "float32", "phase": p} for B, K in ((130, 10), (512, 33)) for p in PHASES]
    return [
        {"B": B, "K": K, "dtype": dt, "phase": p}
        for dt in ("bfloat16", "float32")
        for K in (10, 100, 1000)
        for B in (4096, 65536, 1048576)
        for p in PHASES
    ]


@functools.cache
def _compiled():
    from mixem.bench.harness import compile_for_shapes

    return compile_for_shapes(mixture_terms_torch)


def _objective(out: dict) -> torch.Tensor:
    return -out["marginal_entropy"] + 0.5 * out["instance_entropy"] + 0.5 * out["pimax"]


def setup(case: dict, device: torch.device) -> dict:
    from mixem.kernels import mixture_terms_triton

    logits = (3 * torch.randn(case["B"], case["K"], device=device)).to(getattr(torch, case["dtype"]))  # (B, K)
    logits.requires_grad_()
    ops = {"torch": mixture_terms_torch, "torch.compile": _compiled(), "triton": mixture_terms_triton}
    if case["phase"] == "fwd":

        def make(op):
            def fwd():
                with torch.no_grad():
                    return op(logits)["pi"]

            return fwd
    else:

        def make(op):
            return lambda: torch.autograd.grad(_objective(op(logits)), logits)[0]

    return {name: make(op) for name, op in ops.items()}


def check(case: dict, candidates: dict) -> dict:
    ref, out = candidates["torch"]().double(), candidates["triton"]().double()
    err = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    rtol = 2e-2 if case["dtype"] == "bfloat16" else 1e-5
    assert err <= rtol * max(1e-3, scale), f"max error {err:.3g} vs scale {scale:.3g} (rtol {rtol})"
    return {"max_abs_err": err, "ref_scale": scale}


def work(case: dict) -> dict:
    B, K = case["B"], case["K"]
    es = torch.finfo(getattr(torch, case["dtype"])).bits // 8
    fwd = {"flop": 10 * B * K, "exp": B * K, "bytes": B * K * (es + 4)}
    if case["phase"] == "fwd":
        return fwd
    return {"flop": 2 * fwd["flop"], "exp": 2 * B * K, "bytes": fwd["bytes"] + 2 * B * K * es}


def not_measured(device: torch.device) -> list[str]:
    if device.type != "cuda":
        return ["bfloat16 cases and the GPU case grid (B up to 1M, K up to 1000): need a GPU"]
    return []
