"""The network: backbone trunk + a head (MIX'EM's mixture of embeddings, ccp's centres), and the uint8 inference wrapper."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mixem.backbones import build_backbone
from mixem.config import MixEMConfig


class MixEMOutput(NamedTuple):
    """What every head returns, so training, evaluation, embed and export take any of them unchanged.

    head "centers" (ccp): embedding is the unit-norm instance embedding z, mixture_logits the
    assignment logits z . c_k / tau_c, components the K predicted centres expanded over the batch.
    """

    embedding: torch.Tensor  # (B, D) z = sum_k pi_k e_k, not re-normalised (as released)
    mixture_logits: torch.Tensor  # (B, K) gate logits; pi = softmax
    components: torch.Tensor  # (B, K, D) L2-normalised component embeddings e_k
    features: torch.Tensor  # (B, F) backbone features h


class MixtureHead(nn.Module):
    """MIX'EM's head: K component MLPs F->H->D and a gate MLP F->H->K, batched: one GEMM for all K+1 first
    layers, one batched GEMM for the K second layers (no Python loop over K); z = sum_k pi_k e_k."""

    def __init__(self, in_features: int, cfg: MixEMConfig):
        super().__init__()
        K, hidden, dim = cfg.components, cfg.head_hidden, cfg.embed_dim
        self.K, self.H, self.D = K, hidden, dim
        self.fc1 = nn.Linear(in_features, (K + 1) * hidden)  # [components 0..K-1 | gate]
        self.w2 = nn.Parameter(torch.empty(K, hidden, dim))  # component second layers
        self.b2 = nn.Parameter(torch.zeros(K, dim))
        self.gate2 = nn.Linear(hidden, K)
        bound = 1.0 / hidden**0.5  # nn.Linear's default init, per component
        nn.init.uniform_(self.w2, -bound, bound)
        nn.init.uniform_(self.b2, -bound, bound)

    def forward(self, h: torch.Tensor) -> MixEMOutput:
        B = h.shape[0]
        a = F.relu(self.fc1(h)).view(B, self.K + 1, self.H)  # (B, K+1, H)
        comp = torch.einsum("bkh,khd->bkd", a[:, : self.K], self.w2) + self.b2  # (B, K, D)
        comp = F.normalize(comp, dim=-1)
        logits = self.gate2(a[:, self.K])  # (B, K)
        pi = torch.softmax(logits.float(), dim=1).to(comp.dtype)
        z = torch.einsum("bk,bkd->bd", pi, comp)  # (B, D)
        return MixEMOutput(z, logits, comp, h)

    def class_logits(self, h: torch.Tensor, fc1_gate: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """forward(h).mixture_logits through the gate's slice of fc1 alone (the same values, on this CPU bit for
        bit, at 1/11 of fc1's work: refine.fit_head trains on them); fc1_gate: (weight, bias) to use for that
        slice (class_fit's copies)."""
        gate = slice(self.K * self.H, None)
        w, b = fc1_gate if fc1_gate is not None else (self.fc1.weight[gate], self.fc1.bias[gate])
        return self.gate2(F.relu(F.linear(h, w, b)))

    def class_fit(self) -> tuple[list[torch.Tensor], Callable[[torch.Tensor], torch.Tensor], Callable[[], None]]:
        """What refine.fit_head trains: (tensors, class_logits(h) on them, commit() that writes them back). fc1's
        gate rows are copied into tensors of their own, so the optimizer updates 1/11 of fc1 instead of all of it
        with zero gradients outside the gate (Adam's step there is exactly 0: the same weights, bit for bit)."""
        gate = slice(self.K * self.H, None)
        own = (
            self.fc1.weight[gate].detach().clone().requires_grad_(),
            self.fc1.bias[gate].detach().clone().requires_grad_(),
        )

        def commit() -> None:
            with torch.no_grad():
                self.fc1.weight[gate], self.fc1.bias[gate] = own

        return [*own, *self.gate2.parameters()], lambda h: self.class_logits(h, own), commit


class CenterHead(nn.Module):
    """ccp's head: a projection MLP F->H->D gives the instance embedding z, and a cluster-center
    predictor, K learned seeds (K, H) through an MLP H->H->D, gives the centres C. The centres are
    network outputs trained by the losses, not the result of a k-means step. Both are L2-normalised;
    the assignment logits are z . c_k / tau_c."""

    def __init__(self, in_features: int, cfg: MixEMConfig):
        super().__init__()
        hidden, dim = cfg.head_hidden, cfg.embed_dim
        self.tau = cfg.center_temperature
        self.project = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        # Unit-variance seeds: through the randomly initialised MLP they give K centres in general
        # position, so no two start on top of each other.
        self.seeds = nn.Parameter(torch.randn(cfg.components, hidden))
        self.predictor = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, h: torch.Tensor) -> MixEMOutput:
        z = F.normalize(self.project(h), dim=-1)  # (B, D)
        centers = F.normalize(self.predictor(self.seeds), dim=-1)  # (K, D)
        logits = z @ centers.T / self.tau  # (B, K)
        return MixEMOutput(z, logits, centers.unsqueeze(0).expand(h.shape[0], -1, -1), h)

    def class_logits(self, h: torch.Tensor) -> torch.Tensor:
        """forward(h).mixture_logits (the assignment logits need the embedding and the centres: all of it)."""
        return self.forward(h).mixture_logits

    def class_fit(self) -> tuple[list[torch.Tensor], Callable[[torch.Tensor], torch.Tensor], Callable[[], None]]:
        """What refine.fit_head trains: every head parameter, in place (nothing to write back)."""
        return list(self.parameters()), self.class_logits, lambda: None


HEAD_TYPES = {"mixture": MixtureHead, "centers": CenterHead}  # config.HEADS -> the module that builds it


class MixEM(nn.Module):
    """A backbone trunk and a head (config.head): forward(x) -> MixEMOutput, whatever the head."""

    def __init__(self, cfg: MixEMConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone, feat = build_backbone(cfg)
        self.feature_dim = feat
        self.head = HEAD_TYPES[cfg.head](feat, cfg)
        # uint8 pixels -> normalised input as one multiply-add; buffers follow .to(device) and are
        # constants in an exported graph; non-persistent, so weights files hold only learned state.
        self.register_buffer("pixel_mean", torch.tensor(cfg.mean).view(1, -1, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_inv_std", 1.0 / (torch.tensor(cfg.std).view(1, -1, 1, 1) * 255.0), persistent=False)

    def forward(self, x: torch.Tensor) -> MixEMOutput:
        """x: (B, C, H, W) float, already normalised."""
        return self.head(self.backbone(x))

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) in [0, 255] -> float normalised with the config's mean/std."""
        return (x_uint8.float() - self.pixel_mean) * self.pixel_inv_std


class InferenceModel(nn.Module):
    """What export and embed run: uint8 NCHW at the model's size in, normalisation inside the graph.

    forward(x_uint8) -> (embedding (B, D) L2-normalised mixture embedding, mixture_probs (B, K)),
    plus backbone features (B, F) when built with features=True.
    """

    def __init__(self, model: MixEM, features: bool = False):
        super().__init__()
        self.model, self.features = model, features

    def forward(self, x: torch.Tensor):
        x = self.model.normalize(x)
        out = self.model(x)
        emb = F.normalize(out.embedding.float(), dim=1)
        probs = torch.softmax(out.mixture_logits.float(), dim=1)
        if self.features:
            return emb, probs, out.features.float()
        return emb, probs
