"""Pure-PyTorch reference of every loss term: the specification the Triton kernels must match.

Notation: B images, N = 2B views stacked as [view 1; view 2] (M rows in the kernels),
D embedding dim, K mixture components, tau the temperature.

NT-Xent (SimCLR), rows z_i L2-normalised, s_ik = z_i . z_k / tau, positive p(i) = (i + B) mod N:
    lse_i = log sum_{k != i} exp(s_ik)                 (the "LSE op"; the kernels compute only this)
    l_i   = lse_i - s_{i,p(i)},   L = mean_i l_i
MIX'EM terms on the gate logits a (rows: instances), pi = softmax(a):
    (i)   marginal entropy  H(pbar), pbar = mean_i pi_i           (maximised)
    (ii)  instance entropy  mean_i H(pi_i)  or  mean_i (1 - max_k pi_ik)  (minimised)
    (iii) pull = mean over non-empty components k of mean_{n: c_n = k} ||z_n - mu_k||,
          push = -mean over ordered pairs k != k' of non-empty components of ||mu_k - mu_k'||,
          c_n = argmax_k pi_nk (no gradient), mu_k = mean of z_n with c_n = k.
Refinement on the class logits a (rows: instances), p = softmax(a):
    neighbour consistency  -mean_i log <p_i, p_n(i)>, n(i) a mined nearest neighbour of i
    balanced cross-entropy  CE against confident pseudo-labels, each class weighted by 1 / its share
The released MIX'EM code appends K zero vectors (one per component) before taking the means so
that no component is empty; that drags every mu_k toward the origin and adds K fake points to the
pull term. Here empty components are left out of both terms instead (README, "The method as implemented").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ntxent_lse_torch(z: torch.Tensor, tau: float) -> torch.Tensor:
    """lse_i = log sum_{k != i} exp(z_i . z_k / tau) for one (M, D) matrix; returns (M,) float32+.

    z is used as given (normalise it first for cosine similarity). Materialises the M x M matrix.
    """
    M, D = z.shape
    acc = torch.promote_types(z.dtype, torch.float32)
    s = (z.to(acc) @ z.to(acc).T) / tau  # (M, M)
    s = s.masked_fill(torch.eye(M, dtype=torch.bool, device=z.device), float("-inf"))
    return torch.logsumexp(s, dim=1)  # (M,)


def ntxent_lse_rows_torch(z_rows: torch.Tensor, z_all: torch.Tensor, row_offset: int, tau: float) -> torch.Tensor:
    """lse of rows z_rows (R, D) against all rows of z_all (M, D), excluding each row's own column.

    Row i of z_rows is row (row_offset + i) of z_all: what one rank computes for its rows against
    the all-gathered matrix. ntxent_lse_torch(z) == ntxent_lse_rows_torch(z, z, 0, tau).
    """
    R, D = z_rows.shape
    acc = torch.promote_types(z_rows.dtype, torch.float32)
    s = (z_rows.to(acc) @ z_all.to(acc).T) / tau  # (R, M)
    own = torch.arange(R, device=z_rows.device)
    s = s.index_put((own, own + row_offset), torch.tensor(float("-inf"), dtype=acc, device=z_rows.device))
    return torch.logsumexp(s, dim=1)  # (R,)


def positive_logits_torch(z: torch.Tensor, tau: float) -> torch.Tensor:
    """s_{i,p(i)} for rows stacked as [view 1; view 2]: the dot with the other view of the same image."""
    N, D = z.shape
    if N % 2:
        raise ValueError(f"NT-Xent needs an even number of rows (two views per image), got {N}")
    acc = torch.promote_types(z.dtype, torch.float32)
    partner = torch.cat([z[N // 2 :], z[: N // 2]])  # (N, D)
    return (z.to(acc) * partner.to(acc)).sum(-1) / tau  # (N,)


def nt_xent_torch(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.5, lse=None) -> torch.Tensor:
    """SimCLR NT-Xent with cosine similarity over the 2B views of B images; mean over all 2B rows.

    lse: the LSE op (default ntxent_lse_torch); the fused kernel's wrapper passes its own, so both
    paths share this one assembly of the loss.
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (N, D)
    return ((lse or ntxent_lse_torch)(z, tau) - positive_logits_torch(z, tau)).mean()


def mixture_terms_torch(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mixture statistics of gate logits (B, K), all from one softmax.

    Returns marginal_entropy H(mean_i pi_i), instance_entropy mean_i H(pi_i),
    pimax mean_i (1 - max_k pi_ik), and pi itself (B, K).
    """
    logp = torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=1)
    pi = logp.exp()  # (B, K)
    pbar = pi.mean(0)  # (K,)
    marginal = -(pbar * torch.log(pbar.clamp_min(torch.finfo(pbar.dtype).tiny))).sum()
    instance = -(pi * logp).sum(1).mean()
    pimax = (1.0 - pi.max(1).values).mean()
    return {"marginal_entropy": marginal, "instance_entropy": instance, "pimax": pimax, "pi": pi}


def pull_push_torch(z: torch.Tensor, assign: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Associative-embedding loss (iii): pull z toward its component mean, push the means apart.

    z (B, D) the mixture embeddings, assign (B,) int64 component of each row (argmax pi, no grad).
    Empty components take part in neither term. push is <= 0 (minimising it spreads the means).
    """
    B, D = z.shape
    onehot = F.one_hot(assign, K).to(z.dtype)  # (B, K)
    counts = onehot.sum(0)  # (K,)
    present = counts > 0
    mu = (onehot.T @ z) / counts.clamp_min(1).unsqueeze(1)  # (K, D)
    dist = (z - mu[assign]).norm(dim=1)  # (B,)
    per_comp = (onehot.T @ dist.unsqueeze(1)).squeeze(1) / counts.clamp_min(1)  # (K,)
    n_present = present.sum()
    pull = per_comp[present].sum() / n_present
    mu_p = mu[present]
    if mu_p.shape[0] < 2:
        return pull, z.sum() * 0.0
    diff = mu_p.unsqueeze(0) - mu_p.unsqueeze(1)  # (k, k, D)
    off = ~torch.eye(mu_p.shape[0], dtype=torch.bool, device=z.device)
    # sqrt has an infinite gradient at 0; the diagonal is excluded, and coincident means get eps.
    pair = (diff[off].pow(2).sum(-1) + 1e-12).sqrt()
    return pull, -pair.mean()


def max_entropy(K: int) -> float:
    """log K: the marginal entropy of a perfectly balanced mixture (for logs and tests)."""
    return math.log(K)


# ccp: contrastive clustering with a cluster-center predictor (README "The second method (ccp)"; our
# reading of Sundareswaran et al., arXiv 2109.12714, whose full text is unavailable). Rows z_i and
# centres c_k are unit-norm, assignment logits a_ik = z_i . c_k / tau_c, p_i = softmax(a_i).


def soft_cross_entropy_torch(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean_i H(q_i, p_i) = -mean_i sum_k q_ik log softmax(a_i)_k for logits a (B, K), targets q (B, K).

    Gradient: d/da_i = (p_i - q_i) / B when the rows of q sum to 1.
    """
    return -(target * torch.log_softmax(logits, dim=1)).sum(1).mean()


def assignment_consistency_torch(logits1: torch.Tensor, logits2: torch.Tensor, sharpen: float) -> torch.Tensor:
    """Cross-view assignment consistency with sharpened, stop-gradient targets, (B, K) logits per view:

        q^v_i = softmax(a^v_i / T)  (no gradient),   L = 1/2 [H(q^2, p^1) + H(q^1, p^2)]  (soft_cross_entropy_torch)

    Each view's assignment is supervised by the other view's: the cluster of an image must not depend
    on its augmentation. T < 1 makes each target more confident than the prediction it teaches, so
    assignments sharpen over training (self-training, as DINO's teacher and MixMatch's T do); the stop-
    gradient keeps the target from being dragged toward the prediction. Gradient:
    d/da^1_i = (p^1_i - q^2_i) / (2B), and symmetrically for view 2.
    """
    q1 = torch.softmax(logits1.detach() / sharpen, dim=1)  # (B, K)
    q2 = torch.softmax(logits2.detach() / sharpen, dim=1)  # (B, K)
    return 0.5 * (soft_cross_entropy_torch(logits1, q2) + soft_cross_entropy_torch(logits2, q1))


def soft_cluster_means_torch(z: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """m_k = normalise(sum_i p_ik z_i): the unit direction of cluster k's soft mean, (K, D) from z (N, D),
    probs (N, K). A cluster with no mass gives a zero row (F.normalize's eps), which anchors nothing."""
    return F.normalize(probs.T @ z, dim=1)  # (K, D)


def center_anchor_torch(centers: torch.Tensor, z: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Anchoring of the predicted centres to the data: mean_k (1 - c_k . m_k), m_k = soft_cluster_means_torch(z, p)
    with no gradient, so the centres move toward the data and the data is not dragged toward the
    centres by this term (the clustering loss already does that). centers (K, D) unit-norm.
    Gradient: d/dc_k = -m_k / K.
    """
    m = soft_cluster_means_torch(z.detach(), probs.detach())  # (K, D)
    return (1.0 - (centers * m).sum(1)).mean()


def center_separation_torch(centers: torch.Tensor, tau: float) -> torch.Tensor:
    """Uniformity of the centres: (1/K) sum_k log sum_{l != k} exp(c_k . c_l / tau), centers (K, D) unit-norm.

    Minimised when the centres spread out (its minimum, log(K - 1) - 1 / ((K - 1) tau), is reached at a
    regular simplex when K <= D + 1); it stops two centres from predicting the same cluster, which
    anchoring alone allows (two equal centres have equal soft means and stay equal).
    Gradient: d/dc_k = (1/(K tau)) [sum_{l != k} (w_kl + w_lk) c_l], w_kl = softmax_{l != k}(c_k . c_l / tau).
    """
    return ntxent_lse_torch(centers, tau).mean()  # the same masked log-sum-exp NT-Xent uses, over K rows


# Refinement (README "Refinement"): classes from the representation, after SCAN (Van Gansbeke et al. 2020).


def neighbor_consistency_torch(logits: torch.Tensor, neighbor_logits: torch.Tensor) -> torch.Tensor:
    """-mean_i log <p_i, q_i>: an image and one of its mined neighbours should get the same class.

    logits, neighbor_logits (B, K); p = softmax(logits), q = softmax(neighbor_logits); both get gradients.
    Computed as -mean_i logsumexp_k(log p_ik + log q_ik), which stays finite where <p, q> underflows.
    Gradient: d/da_ik = (p_ik - r_ik) / B, r_i = p_i * q_i / <p_i, q_i> (symmetrically for the neighbour).
    """
    lp = torch.log_softmax(_at_least_fp32(logits), dim=1)
    lq = torch.log_softmax(_at_least_fp32(neighbor_logits), dim=1)
    return -torch.logsumexp(lp + lq, dim=1).mean()


def balanced_cross_entropy_torch(logits: torch.Tensor, target: torch.Tensor, K: int) -> torch.Tensor:
    """Cross-entropy of logits (B, K) against integer targets (B,), each class weighted by the inverse of its
    share of the targets, normalised by the total weight: every class present counts equally, so the classes
    with the most confident images do not swallow the rest (self-labelling's pseudo-labels are unbalanced).
    Empty target set: 0 (with a gradient path, so the step is a no-op rather than an error).
    """
    if target.numel() == 0:
        return logits.sum() * 0.0
    counts = torch.bincount(target, minlength=K).double()
    weight = torch.where(counts > 0, target.numel() / counts.clamp_min(1), torch.zeros_like(counts))
    logits = _at_least_fp32(logits)
    return F.cross_entropy(logits, target, weight=weight.to(logits.dtype))


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
