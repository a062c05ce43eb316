"""The training objectives (MIX'EM, plain SimCLR, ccp): named loss terms plus their weighted total (mixem.methods names them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixem import losses, methods
from mixem.config import IMPLS, TrainConfig
from mixem.distributed import SINGLE, DistContext, gather
from mixem.errors import ConfigError
from mixem.model import MixEMOutput


def resolve_impl(impl: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA, 'torch' elsewhere; 'triton' off CUDA runs Triton's interpreter."""
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl not in IMPLS:
        raise ConfigError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    return impl


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float, impl: str = "auto") -> torch.Tensor:
    """NT-Xent over the two views, by the reference or the fused kernel."""
    if resolve_impl(impl, z1.device) == "triton":
        from mixem.kernels import nt_xent_triton

        return nt_xent_triton(z1, z2, tau)
    return losses.nt_xent_torch(z1, z2, tau)


def ntxent_lse_rows(z_rows, z_all, row_offset: int, tau: float, impl: str = "auto") -> torch.Tensor:
    """lse of a block of rows against all (gathered) rows, by the reference or the fused kernel."""
    if resolve_impl(impl, z_rows.device) == "triton":
        from mixem.kernels import ntxent_lse_rows_triton

        return ntxent_lse_rows_triton(z_rows, z_all, row_offset, tau)
    return losses.ntxent_lse_rows_torch(z_rows, z_all, row_offset, tau)


def nt_xent_global(z1: torch.Tensor, z2: torch.Tensor, tau: float, impl: str, ctx: DistContext) -> torch.Tensor:
    """NT-Xent over the global batch [views 1 of all ranks; views 2 of all ranks]; each rank computes its
    own rows against every gathered row and returns W x its share (see mixem.distributed)."""
    if not ctx.enabled:
        return nt_xent(z1, z2, tau, impl)
    B = z1.shape[0]  # local images
    Bg = B * ctx.world
    n1, n2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)  # (B, D), input dtype: bf16 reaches the kernel
    z_all = torch.cat([gather(n1, ctx), gather(n2, ctx)])  # (2Bg, D)
    lse1 = ntxent_lse_rows(n1, z_all, ctx.rank * B, tau, impl)  # (B,)
    lse2 = ntxent_lse_rows(n2, z_all, Bg + ctx.rank * B, tau, impl)  # (B,)
    pos = (n1.float() * n2.float()).sum(-1) / tau  # (B,) the positive of a view-1 row is its view-2 row and vice versa
    return ((lse1 - pos).sum() + (lse2 - pos).sum()) / (2 * Bg) * ctx.world


def mixture_terms(logits: torch.Tensor, impl: str = "auto") -> dict[str, torch.Tensor]:
    """Marginal entropy, instance entropy, 1 - max pi and pi, by the reference or the fused kernel."""
    if resolve_impl(impl, logits.device) == "triton":
        from mixem.kernels import mixture_terms_triton

        return mixture_terms_triton(logits)
    return losses.mixture_terms_torch(logits)


def mixem_objective(
    o1: MixEMOutput, o2: MixEMOutput, cfg: TrainConfig, ctx: DistContext = SINGLE
) -> dict[str, torch.Tensor]:
    """MIX'EM loss for two views: NT-Xent on the mixture embedding, (i)-(iii) per view, summed over views
    as the released code does. Returns every term by name and 'loss', the total to minimise.
    Under torchrun every term covers the global batch (mixem.distributed)."""
    K = o1.mixture_logits.shape[1]
    terms = simclr_objective(o1, o2, cfg, ctx)
    marginal = instance = pull = push = 0.0
    for o in (o1, o2):
        logits, z = gather(o.mixture_logits, ctx), gather(o.embedding.float(), ctx)  # global batch
        m = mixture_terms(logits, cfg.impl)
        marginal = marginal + m["marginal_entropy"]
        instance = instance + (m["instance_entropy"] if cfg.instance_term == "entropy" else m["pimax"])
        if cfg.w_pull or cfg.w_push:
            p, q = losses.pull_push_torch(z, m["pi"].detach().argmax(1), K)
            pull, push = pull + p, push + q
    terms.update(marginal_entropy=marginal / 2, instance=instance / 2)
    total = terms["ntxent"] - cfg.w_marginal * marginal + cfg.w_instance * instance
    if cfg.w_pull or cfg.w_push:
        terms.update(pull=pull / 2, push=push / 2)
        total = total + cfg.w_pull * pull + cfg.w_push * push
    terms["loss"] = total
    return terms


def ccp_objective(
    o1: MixEMOutput, o2: MixEMOutput, cfg: TrainConfig, ctx: DistContext = SINGLE
) -> dict[str, torch.Tensor]:
    """ccp loss for two views from the centers head (README "The second method (ccp)"):

        loss = instance + w_cluster * (consistency - w_balance * balance) + w_anchor * (anchoring + separation)

    instance: NT-Xent on z; consistency: cross-view cross-entropy against the other view's sharpened
    assignment; balance: H(mean_i p_i) per view, averaged; anchoring: 1 - c_k . (soft mean of cluster k);
    separation: uniformity of the centres. Under torchrun every term but NT-Xent is computed on the
    gathered global batch, identically on every rank (mixem.distributed).
    """
    terms = {"instance": nt_xent_global(o1.embedding, o2.embedding, cfg.temperature, cfg.impl, ctx)}
    a1, a2 = gather(o1.mixture_logits, ctx), gather(o2.mixture_logits, ctx)  # (Bg, K) each
    consistency = losses.assignment_consistency_torch(a1, a2, cfg.sharpen)
    balance = (mixture_terms(a1, cfg.impl)["marginal_entropy"] + mixture_terms(a2, cfg.impl)["marginal_entropy"]) / 2
    centers = o1.components[0]  # (K, D): the predicted centres are the same for every row
    # The soft means are targets (no gradient): gather the embeddings detached, in fp32 like the
    # logits (the embedding may arrive in bf16), in the same [all views 1; all views 2] order.
    z = torch.cat([gather(o.embedding.detach().float(), ctx) for o in (o1, o2)])  # (2Bg, D)
    anchoring = losses.center_anchor_torch(centers, z, torch.softmax(torch.cat([a1, a2]).detach(), dim=1))
    separation = losses.center_separation_torch(centers, cfg.anchor_temperature)
    terms.update(
        cluster=consistency - cfg.w_balance * balance,
        consistency=consistency,
        balance=balance,
        anchor=anchoring + separation,
        anchoring=anchoring,
        separation=separation,
    )
    terms["loss"] = terms["instance"] + cfg.w_cluster * terms["cluster"] + cfg.w_anchor * terms["anchor"]
    return terms


def simclr_objective(
    o1: MixEMOutput, o2: MixEMOutput, cfg: TrainConfig, ctx: DistContext = SINGLE
) -> dict[str, torch.Tensor]:
    """Plain SimCLR: NT-Xent on the embedding z alone, no mixture term (the gate learns only through z)."""
    ntxent = nt_xent_global(o1.embedding, o2.embedding, cfg.temperature, cfg.impl, ctx)
    return {"ntxent": ntxent, "loss": ntxent}


def objective(o1: MixEMOutput, o2: MixEMOutput, cfg: TrainConfig, ctx: DistContext = SINGLE) -> dict[str, torch.Tensor]:
    """The loss terms of cfg.method's objective (mixem.methods)."""
    return methods.get(cfg.method).objective_fn()(o1, o2, cfg, ctx)


def detach_terms(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in terms.items()}
