"""The training objectives (MIX'EM, plain SimCLR): named loss terms plus their weighted total."""

from __future__ import annotations

import torch

from mixem import losses
from mixem.config import TrainConfig
from mixem.errors import ConfigError
from mixem.model import MixEMOutput


def resolve_impl(impl: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA, 'torch' elsewhere; 'triton' off CUDA runs Triton's interpreter."""
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl not in ("triton", "torch"):
        raise ConfigError(f"impl must be auto, triton or torch, got {impl!r}")
    return impl


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float, impl: str = "auto") -> torch.Tensor:
    """NT-Xent over the two views, by the reference or the fused kernel."""
    if resolve_impl(impl, z1.device) == "triton":
        from mixem.kernels import nt_xent_triton

        return nt_xent_triton(z1, z2, tau)
    return losses.nt_xent_torch(z1, z2, tau)


def mixture_terms(logits: torch.Tensor, impl: str = "auto") -> dict[str, torch.Tensor]:
    """Marginal entropy, instance entropy, 1 - max pi and pi, by the reference or the fused kernel."""
    if resolve_impl(impl, logits.device) == "triton":
        from mixem.kernels import mixture_terms_triton

        return mixture_terms_triton(logits)
    return losses.mixture_terms_torch(logits)


def mixem_objective(o1: MixEMOutput, o2: MixEMOutput, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """MIX'EM loss for two views: NT-Xent on the mixture embedding, (i)-(iii) per view, summed over views
    as the released code does. Returns every term by name and 'loss', the total to minimise."""
    K = o1.mixture_logits.shape[1]
    terms = {"ntxent": nt_xent(o1.embedding, o2.embedding, cfg.temperature, cfg.impl)}
    if cfg.method == "simclr":
        terms["loss"] = terms["ntxent"]
        return terms
    marginal = instance = pull = push = 0.0
    for o in (o1, o2):
        m = mixture_terms(o.mixture_logits, cfg.impl)
        marginal = marginal + m["marginal_entropy"]
        instance = instance + (m["instance_entropy"] if cfg.instance_term == "entropy" else m["pimax"])
        if cfg.w_pull or cfg.w_push:
            p, q = losses.pull_push_torch(o.embedding, m["pi"].detach().argmax(1), K)
            pull, push = pull + p, push + q
    terms.update(marginal_entropy=marginal / 2, instance=instance / 2)
    total = (terms["ntxent"] - cfg.w_marginal * marginal + cfg.w_instance * instance)
    if cfg.w_pull or cfg.w_push:
        terms.update(pull=pull / 2, push=push / 2)
        total = total + cfg.w_pull * pull + cfg.w_push * push
    terms["loss"] = total
    return terms


def objective(o1: MixEMOutput, o2: MixEMOutput, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    if cfg.method in ("mixem", "simclr"):
        return mixem_objective(o1, o2, cfg)
    raise ConfigError(f"method {cfg.method!r} is not available yet in this build; use mixem or simclr")


def detach_terms(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in terms.items()}


__all__ = ["resolve_impl", "nt_xent", "mixture_terms", "mixem_objective", "objective", "detach_terms"]
