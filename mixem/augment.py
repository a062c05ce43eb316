"""SimCLR augmentation on the training device, batched, with per-sample random parameters (kornia)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from mixem.config import MixEMConfig, TrainConfig


def build_views(model_cfg: MixEMConfig, train_cfg: TrainConfig) -> nn.Module:
    """uint8 (B, C, H, W) -> the two SimCLR views of every image, (2B, C, S, S): first views, then second.

    The first view crops train_cfg.crop_scale of the image, the second second_crop_scale (asymmetric views,
    as the global/local crops of SwAV and DINO; None = crop_scale, SimCLR's symmetric views, drawn as before).
    train_cfg.erase > 0 erases a random patch of each view with that probability (the `cpu` preset: 0.5).
    """
    first = build_augment(model_cfg, train_cfg, erase=train_cfg.erase)
    second = first if train_cfg.second_crop_scale is None else build_augment(
        model_cfg, train_cfg, erase=train_cfg.erase, crop_scale=train_cfg.second_crop_scale
    )  # fmt: skip
    return _TwoViews(first, second)


def build_augment(
    model_cfg: MixEMConfig, train_cfg: TrainConfig, erase: float = 0.0, crop_scale: tuple[float, float] | None = None
) -> nn.Module:
    """uint8 (B, C, H, W) -> normalised float views (B, C, S, S), S = model_cfg.image_size.

    SimCLR's recipe: random resized crop, horizontal flip, colour jitter (brightness/contrast and, for
    RGB, saturation/hue) w.p. jitter_p, random grayscale (RGB), gaussian blur (on by default >= 64 px,
    kernel ~10 % of the side as in SimCLR). erase > 0 appends random erasing (Cutout-like, 2-25 % of the
    area, filled with the mean) with that probability: self-labelling's strong view. All parameters are
    drawn per sample from torch's RNG. crop_scale: the crop's area range (None = train_cfg.crop_scale).
    """
    import kornia.augmentation as K

    S, C = model_cfg.image_size, model_cfg.in_channels
    s = train_cfg.color_jitter
    ops: list[nn.Module] = [
        _batched_crop()((S, S), scale=crop_scale or train_cfg.crop_scale, ratio=(3 / 4, 4 / 3), p=1.0),
        K.RandomHorizontalFlip(p=0.5),
    ]
    if s > 0 and train_cfg.jitter_p > 0:
        if C == 3:
            ops.append(K.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=train_cfg.jitter_p))
        else:  # saturation and hue do not exist for one channel
            ops.append(K.ColorJitter(0.8 * s, 0.8 * s, 0.0, 0.0, p=train_cfg.jitter_p))
    if C == 3 and train_cfg.grayscale_p > 0:
        ops.append(K.RandomGrayscale(p=train_cfg.grayscale_p))
    blur = train_cfg.blur if train_cfg.blur is not None else S >= 64
    if blur:
        k = max(3, int(0.1 * S) // 2 * 2 + 1)
        ops.append(K.RandomGaussianBlur((k, k), sigma=(0.1, 2.0), p=0.5))
    ops.append(K.Normalize(mean=torch.tensor(model_cfg.mean), std=torch.tensor(model_cfg.std)))
    if erase > 0:  # after Normalize: the erased patch is 0, the mean pixel
        ops.append(K.RandomErasing(scale=(0.02, 0.25), ratio=(0.3, 3.3), value=0.0, p=erase))
    return _Augment(ops)


def build_plain(model_cfg: MixEMConfig) -> nn.Module:
    """uint8 (B, C, S, S) -> normalised float images, each mirrored with probability 0.5 and otherwise as it is:
    the neighbour stage's plain view of a neighbour (TrainConfig.refine_neighbor_view "plain")."""
    import kornia.augmentation as K

    ops = [
        K.RandomHorizontalFlip(p=0.5),
        K.Normalize(mean=torch.tensor(model_cfg.mean), std=torch.tensor(model_cfg.std)),
    ]
    return _Augment(ops)


def resized_crops(x: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Each image's box (kornia's (B, 4, 2) corners, inclusive pixel indices) resized to `size`, bilinear with
    align_corners, as kornia's slice mode does one image at a time: here two batched matmuls, x @ Wx^T, then
    Wy @ that, with each (out, in) weight matrix holding torch's two bilinear weights per output pixel."""
    src = boxes.long()
    x0, x1, y0, y1 = src[:, 0, 0], src[:, 1, 0], src[:, 0, 1], src[:, 3, 1]
    wy = _bilinear_weights(y0, y1 - y0 + 1, size[0], x.shape[-2])
    wx = _bilinear_weights(x0, x1 - x0 + 1, size[1], x.shape[-1])
    return wy[:, None] @ (x @ wx.transpose(1, 2)[:, None])


def _bilinear_weights(start: torch.Tensor, length: torch.Tensor, out: int, full: int) -> torch.Tensor:
    """(B, out, full): row r of image b puts torch's align_corners weights on the two pixels of its crop
    [start, start + length) that output pixel r reads (upsample_bilinear2d's source index and lambdas, fp32)."""
    scale = (length - 1).float() / (out - 1) if out > 1 else torch.zeros(len(start), device=start.device)
    real = scale[:, None] * torch.arange(out, dtype=torch.float32, device=start.device)
    first = real.floor()
    lam = (real - first).clamp(0, 1)
    first = first.long()
    second = first + (first < (length - 1)[:, None]).long()
    w = torch.zeros(len(start), out, full, device=start.device)
    w.scatter_add_(2, (start[:, None] + first)[..., None], (1 - lam)[..., None])
    return w.scatter_add_(2, (start[:, None] + second)[..., None], lam[..., None])


@functools.cache
def _batched_crop() -> type:
    """kornia's RandomResizedCrop with its boxes drawn as kornia draws them (the same random numbers, so every later
    op draws the same too) and resized by resized_crops: kornia's per-image interpolate calls to fp32 rounding
    (1.8e-7 at most on [0, 1] pixels, measured; tests/mixem/test_augment.py), 2.3 -> 0.6 ms for 128 images at 28 px
    on one CPU thread, and one batched call instead of one per image on a GPU."""
    import kornia.augmentation as K

    class BatchedResizedCrop(K.RandomResizedCrop):
        def apply_transform(self, input, params, flags, transform=None):
            if flags["cropping_mode"] != "slice" or flags["resample"].name != "BILINEAR" or not flags["align_corners"]:
                return super().apply_transform(input, params, flags, transform)
            return resized_crops(input, params["src"].to(input.device), flags["size"])

    return BatchedResizedCrop


class _Augment(nn.Module):
    """kornia's augmentations applied one after the other: the same random draws and the same images to the bit
    as kornia's AugmentationSequential of the same ops (the crop resized by resized_crops: kornia's own crop makes
    them to fp32 rounding; tests/mixem/test_augment.py), without the container's
    bookkeeping (input conversion, data keys, a cached copy of the output): 13.6-14.7 -> 10.3-10.7 ms per
    training step of the cpu preset (two views of 128 images) on one thread, measured."""

    def __init__(self, ops: list[nn.Module]):
        super().__init__()
        self.ops = nn.Sequential(*ops)

    @torch.no_grad()
    def forward(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return self.ops(x_uint8.float().div_(255.0))


class _TwoViews(nn.Module):
    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.first(x_uint8), self.second(x_uint8)])
