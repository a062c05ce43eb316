"""Refinement: after the representation, the head's K-way softmax is trained into the classes (README "Refinement").

The head first learns the lower-objective k-means partition of the embedding (cross-entropy on the frozen
backbone's features: seconds), so refinement starts from the best clustering the representation gives, not
from whatever the head's softmax was. Then two stages, each a `training.Stage` with its own checkpoints and resume:
  neighbors  every image and one of its mined nearest neighbours (both augmented) should get the same
             class; the batch-marginal entropy keeps every class in use (SCAN's objective);
  selflabel  images classified with probability > threshold, or among the most confident share of their
             class, become pseudo-labels for their strongly augmented view (class-balanced cross-entropy,
             whole network); they are re-drawn every epoch.
The classes are the head the model already has (MIX'EM's gate pi, ccp's centre assignments), so what
export, embed and cluster return as `mixture_probs` become class probabilities with no change of contract.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mixem import checkpoint as ckpt
from mixem.augment import build_augment, build_plain
from mixem.config import MixEMConfig, TrainConfig
from mixem.distributed import SINGLE, DistContext, barrier
from mixem.errors import ConfigError
from mixem.evaluate import extract_features
from mixem.feature_cache import representation_features
from mixem.files import save_npy
from mixem.losses import balanced_cross_entropy_torch, mixture_terms_torch, neighbor_consistency_torch
from mixem.optim import lazy_trainer, make_optimizer, make_schedule
from mixem.runlog import RunLog
from mixem.training import Stage, autocast_for, run_stage, wrap_for_training

NEIGHBORS = "neighbors.npy"  # (N, k) int64 in the run directory: the mined neighbours, reused on resume


def mine_neighbors(x: np.ndarray, k: int) -> np.ndarray:
    """(N, k) indices of each row's k nearest other rows by inner product (cosine for unit rows), exact.

    FAISS IndexFlatIP (brute force); a row never lists itself, duplicates of it are kept as neighbours.
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    N = len(x)
    if N < 2:
        raise ConfigError(f"neighbour mining needs at least 2 images, got {N}")
    k = min(k, N - 1)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, found = index.search(x, k + 1)  # (N, k+1), usually self first
    is_self = found == np.arange(N)[:, None]
    drop = is_self.copy()
    drop[~is_self.any(1), -1] = True  # self not among them (ties with duplicates): drop the farthest instead
    return found[~drop].reshape(N, k).astype(np.int64)


def load_or_mine(
    embedding: Callable[[], np.ndarray], n: int, train_cfg: TrainConfig, run_dir: Path, log: RunLog, ctx: DistContext
) -> np.ndarray:
    """The run's neighbours among its n images: read from run_dir/neighbors.npy when resuming a run that has
    them, else mined on embedding() (every rank mines the same ones; rank 0 writes the file atomically)."""
    path = Path(run_dir) / NEIGHBORS
    k = min(train_cfg.refine_neighbors, n - 1)
    nb = np.load(path, allow_pickle=False) if path.exists() else None
    # Every rank looks before rank 0 may write the file: a rank that looked after it was written would skip the
    # barrier below that the others wait at (it hung under torchrun).
    barrier(ctx)
    if nb is not None and nb.shape == (n, k):
        return nb
    nb = mine_neighbors(embedding(), k)
    if ctx.main:
        save_npy(path, nb)
    barrier(ctx)
    log.event("neighbors", k=k, images=n)
    return nb


# k-means++ restarts of the start partition (README "Refinement", the head's start). The neighbour stage tends to
# end in the basin it starts in: stop 45's quickstart seed 7 drew it from best-of-10 partitions at k-means objective
# 4698-4702 (ACC 0.67-0.69, scored afterwards) three times, ending at 0.67-0.71, and once from 4649 (0.70), ending
# at 0.744; 50 restarts reach 4649 at both of its draws' seeds. About 0.7 s on one thread of 10,000 images.
START_RESTARTS = 50


def start_partition(feats: dict, K: int, seed: int):
    """The k-means run refinement starts from (mixem.kmeans.KMeansResult: `assign`, `objective`): k-means (K) on
    the L2-normalised embedding, from the head's own groups and from k-means++ (best of START_RESTARTS), whichever
    ends at the lower k-means objective (no labels are looked at)."""
    from mixem.kmeans import kmeans

    x, probs = feats["embedding"], feats["probs"]
    runs = [kmeans(x, K, init="mixture", mixture_probs=probs, seed=seed), kmeans(x, K, nredo=START_RESTARTS, seed=seed)]
    return min(runs, key=lambda r: r.objective)


def fit_head(model, feats: dict, target: np.ndarray, device, seed: int, epochs: int = 20, lr: float = 1e-3) -> float:
    """Fit the head's class logits to `target` by cross-entropy on the frozen backbone's features of the
    un-augmented images (seconds: the head's class logits alone, head.class_fit; MIX'EM's head skips its
    components' 10/11 of the first layer in the forward, stop 42, and in Adam's update: 7.3 s to 2.9 s to 1.0-1.1 s
    on one thread of the quickstart, the same weights); returns the fraction of images whose argmax then agrees."""
    h = torch.from_numpy(feats["backbone"]).to(device)
    y = torch.from_numpy(target).to(device)
    params, class_logits, commit = model.head.class_fit()
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(h), generator=g).to(device).split(256):
            loss = F.cross_entropy(class_logits(h[idx]).float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    commit()
    with torch.no_grad():
        return float((model.head.class_logits(h).argmax(1) == y).float().mean())


def refine(
    model,
    images: torch.Tensor,
    model_cfg: MixEMConfig,
    train_cfg: TrainConfig,
    *,
    run_dir: Path,
    log: RunLog,
    device: torch.device | str,
    ctx: DistContext = SINGLE,
    resume: bool = False,
    labels: np.ndarray | None = None,
    on_stage: Callable | None = None,
    features: dict[str, np.ndarray] | None = None,
) -> list[dict]:
    """Both refinement stages on the trained model (in place); returns their epoch records.

    on_stage(name, model) is called on rank 0 after each stage (the session scores it there).
    `labels` are only reported (neighbour agreement in the log), never trained on.
    `features`: extract_features of the model on `images` where the caller has them (the session scores the
    representation first); else they are extracted when needed (mining, the head's start), at most once: a
    resumed run whose neighbour stage has begun needs neither.
    """
    device = torch.device(device)
    images = images.to(device)
    B = min(train_cfg.refine_batch_size or train_cfg.batch_size, len(images))
    feats = dict(features or {})

    def representation() -> dict[str, np.ndarray]:
        if not feats:  # kept in the representation's checkpoint by a candidate run, or extracted (feature_cache)
            feats.update(
                representation_features(model, images, run_dir, device, keep=train_cfg.keep_features and ctx.main)
            )
        return feats

    nb = load_or_mine(lambda: representation()["embedding"], len(images), train_cfg, run_dir, log, ctx)
    if labels is not None:
        agree = float((np.asarray(labels)[nb] == np.asarray(labels)[:, None]).mean())
        log.print(f"refine: {nb.shape[1]} neighbours per image ({NEIGHBORS}); {agree:.1%} share the image's label")
        log.event("neighbor_agreement", value=agree)
    if ckpt.newest(run_dir, "neighbors") is None or not resume:  # a fresh start (resume restores the head)
        start = start_partition(representation(), model_cfg.components, train_cfg.seed)
        agree = fit_head(model, representation(), start.assign.astype(np.int64), device, train_cfg.seed)
        log.print(
            f"refine: head started from the lower-objective k-means partition (objective {start.objective:.1f}, of the "
            f"head's groups and {START_RESTARTS} k-means++ restarts; {agree:.1%} of images agree)"
        )
        log.event("start_partition", objective=round(float(start.objective), 3), restarts=START_RESTARTS, agree=agree)
    common = dict(run_dir=run_dir, log=log, ctx=ctx, resume=resume)
    history = []
    stages = (
        (Stage("neighbors", train_cfg.refine_epochs, B, train_cfg.seed, index=1), _neighbor_step, nb),
        (Stage("selflabel", train_cfg.selflabel_epochs, B, train_cfg.seed, index=2), _selflabel_step, None),
    )
    for stage, make_step, extra in stages:
        if stage.epochs == 0:
            continue
        trainer, one_step = make_step(model, images, extra, model_cfg, train_cfg, ctx, device, stage)
        records, _ = run_stage(stage, model, trainer, one_step, len(images), model_cfg, train_cfg, **common)
        history += records
        for p in model.parameters():
            p.requires_grad_(True)
        if on_stage is not None and ctx.main:
            on_stage(stage.prefix, model)
    return history


def _trainer(params, lr: float, train_cfg: TrainConfig, stage: Stage, n_images: int):
    """The stage's lazy_trainer: AdamW, 5 % warm-up, cosine decay."""
    steps = (n_images // stage.batch_size) * stage.epochs
    return lazy_trainer(
        lambda: make_optimizer(params, lr, train_cfg), lambda opt: make_schedule(opt, max(1, steps // 20), steps)
    )


def _neighbor_step(model, images, nb, model_cfg, train_cfg, ctx, device, stage):
    """One step: anchors (augmented) and a random one of each anchor's neighbours (augmented, or plain: mirrored
    at random only) pass together; loss = consistency - refine_entropy * H(mean anchor class probabilities).
    The gradient flows through both (with the plain neighbour's side detached, the classes fell apart: stop 40)."""
    if not train_cfg.refine_backbone:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    freeze_outside_head(model, model_cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]
    trainer = _trainer(params, train_cfg.refine_lr, train_cfg, stage, len(images))
    fwd = wrap_for_training(model, train_cfg, ctx, device)
    augment = build_augment(model_cfg, train_cfg).to(device)
    neighbor_view = build_plain(model_cfg).to(device) if train_cfg.refine_neighbor_view == "plain" else augment
    autocast = autocast_for(train_cfg, device)
    neighbors = torch.from_numpy(nb).to(device)

    def one_step(idx: torch.Tensor) -> dict[str, torch.Tensor]:
        if not train_cfg.refine_backbone:
            model.backbone.eval()  # frozen: its BatchNorm statistics stay those of the representation
        idx = idx.to(device)
        pick = torch.randint(neighbors.shape[1], (len(idx),), device=device)
        views = torch.cat([augment(images[idx]), neighbor_view(images[neighbors[idx, pick]])])
        with autocast:
            out = fwd(views.contiguous(memory_format=torch.channels_last))
        a, b = out.mixture_logits.float().chunk(2)
        consistency = neighbor_consistency_torch(a, b)
        marginal = mixture_terms_torch(a)["marginal_entropy"]
        loss = consistency - train_cfg.refine_entropy * marginal
        _update(*trainer(), loss)
        return {"loss": loss, "consistency": consistency, "marginal_entropy": marginal}

    return trainer, one_step


def freeze_outside_head(model, model_cfg, device) -> None:
    """Stop the gradient of the parameters the class logits do not depend on (MIX'EM's component embeddings):
    the refinement losses use the logits alone, so those get no gradient anyway (and no update), but DDP under
    torchrun would wait for it and fail at the next step. Found by differentiating the logits of a probe batch
    in eval mode (BatchNorm statistics untouched); run_stage's caller unfreezes everything after the stage."""
    was = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    probe = torch.rand(2, model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size, device=device)
    grads = torch.autograd.grad(model(probe).mixture_logits.sum(), params, allow_unused=True)
    model.train(was)
    for p, g in zip(params, grads):
        if g is None:
            p.requires_grad_(False)


def pseudo_labels(probs: torch.Tensor, threshold: float, share: float) -> torch.Tensor:
    """(N,) targets from class probabilities (N, K): an image's argmax where its probability passes `threshold`
    or ranks in the top `share` of the images assigned to that class, else -1 (no target).

    The per-class share keeps every class in the training set: with the threshold alone, a class the head is
    not yet sure of has no pseudo-labels, the balanced loss no longer sees it, and it empties (measured).
    """
    conf, target = probs.max(1)
    keep = conf > threshold
    for c in target.unique():
        members = (target == c).nonzero().squeeze(1)
        top = members[conf[members].argsort(descending=True)[: int(share * len(members))]]
        keep[top] = True
    return torch.where(keep, target, torch.full_like(target, -1))


def _selflabel_step(model, images, _, model_cfg, train_cfg, ctx, device, stage):
    """One step: the strongly augmented view learns the epoch's pseudo-labels (class-balanced cross-entropy).

    Pseudo-labels are drawn at the start of every epoch from the un-augmented images (model in eval mode);
    images without one are masked out of the loss, so all ranks run the same graph."""
    freeze_outside_head(model, model_cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]
    trainer = _trainer(params, train_cfg.selflabel_lr, train_cfg, stage, len(images))
    fwd = wrap_for_training(model, train_cfg, ctx, device)
    strong = build_augment(model_cfg, train_cfg, erase=0.5).to(device)
    autocast = autocast_for(train_cfg, device)
    K, steps_per_epoch = model_cfg.components, len(images) // stage.batch_size
    state = {"step": 0, "targets": None}

    def one_step(idx: torch.Tensor) -> dict[str, torch.Tensor]:
        if state["step"] % steps_per_epoch == 0:  # a new epoch (a resumed stage also starts at one)
            probs = torch.from_numpy(extract_features(model, images, device=device)["probs"]).to(device)
            state["targets"] = pseudo_labels(probs, train_cfg.selflabel_threshold, train_cfg.selflabel_share)
        state["step"] += 1
        idx = idx.to(device)
        target = state["targets"][idx]
        mask = target >= 0
        with autocast:
            logits = fwd(strong(images[idx]).contiguous(memory_format=torch.channels_last)).mixture_logits.float()
        loss = balanced_cross_entropy_torch(logits[mask], target[mask], K)
        _update(*trainer(), loss)
        return {"loss": loss, "labelled": mask.float().mean()}

    return trainer, one_step


def _update(opt, sched, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
