"""The two training views: each takes its own crop range; symmetric views draw exactly as before; the neighbour
stage's plain view."""

import pytest
import torch

from mixem.augment import build_augment, build_plain, build_views, resized_crops
from mixem.config import MixEMConfig, TrainConfig
from mixem.errors import ConfigError

MODEL = MixEMConfig(backbone="convnet", width=8, image_size=28, in_channels=1, mean=(0.5,), std=(0.5,))
PLAIN = dict(jitter_p=0.0, blur=False, grayscale_p=0.0)  # crops and flips only


def _ramps(n: int) -> torch.Tensor:
    """n uint8 images whose pixel value is 9 x the column: a crop's value range is its width."""
    ramp = (torch.arange(28) * 9).to(torch.uint8)
    return ramp.expand(n, 1, 28, 28).contiguous()


def _widths(views: torch.Tensor) -> torch.Tensor:
    """Each view's value range as a share of the whole image's (1.0 = the crop spans every column)."""
    full = (27 * 9 / 255) / 0.5  # after Normalize(0.5, 0.5)
    flat = views.flatten(1)
    return (flat.amax(1) - flat.amin(1)) / full


def test_second_view_takes_its_own_crop_range():
    torch.manual_seed(0)
    cfg = TrainConfig(crop_scale=(0.1, 0.1), second_crop_scale=(1.0, 1.0), **PLAIN)
    views = build_views(MODEL, cfg)(_ramps(64))
    assert views.shape == (128, 1, 28, 28)
    first, second = _widths(views[:64]), _widths(views[64:])
    assert first.max() < 0.6, first  # a 10 % crop spans at most ~37 % of the columns (aspect 3/4..4/3)
    assert second.min() > 0.95, second  # the whole image
    # Symmetric views (the default): both halves are the small crops.
    torch.manual_seed(0)
    sym = build_views(MODEL, TrainConfig(crop_scale=(0.1, 0.1), **PLAIN))(_ramps(64))
    assert _widths(sym).max() < 0.6


@pytest.mark.parametrize("seed", [0, 7])
def test_symmetric_views_draw_as_two_calls_of_one_augmentation(seed):
    """second_crop_scale=None must consume the RNG as before it existed: old runs resume to the same weights."""
    cfg = TrainConfig(crop_scale=(0.35, 1.0))  # SimCLR's jitter on, so the stream's every draw counts
    x = torch.randint(0, 256, (33, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    new = build_views(MODEL, cfg)(x)
    torch.manual_seed(seed)
    aug = build_augment(MODEL, cfg)
    old = torch.cat([aug(x), aug(x)])
    assert torch.equal(new, old)


def test_second_crop_scale_is_checked():
    assert TrainConfig(second_crop_scale=[0.8, 1]).second_crop_scale == (0.8, 1.0)  # a JSON list
    assert TrainConfig().second_crop_scale is None
    for bad in ([0.0, 1.0], [0.5, 1.2], [0.9, 0.8], [0.5]):
        with pytest.raises(ConfigError, match=r"^second_crop_scale must be two numbers 0 < lo <= hi <= 1"):
            TrainConfig(second_crop_scale=bad)
    with pytest.raises(ConfigError, match="^second_crop_scale must be a list of numbers or null"):
        TrainConfig(second_crop_scale="0.8")


def test_erase_blanks_a_patch_of_every_view_and_is_checked():
    """erase=1: each of both views gets a patch set to 0 (the mean pixel after Normalize); erase=0: none does."""
    x = torch.full((16, 1, 28, 28), 255, dtype=torch.uint8)  # 255 normalises to 1.0: only erasing makes a 0
    torch.manual_seed(0)
    cfg = TrainConfig(crop_scale=(0.5, 1.0), second_crop_scale=(0.8, 1.0), erase=1.0, **PLAIN)
    views = build_views(MODEL, cfg)(x)
    erased = (views == 0).flatten(1).float().mean(1)  # the share of each view's pixels erased
    assert views.shape == (32, 1, 28, 28)
    assert erased.min() > 0.01 and erased.max() < 0.3, erased  # 2-25 % of the area, both views
    plain = build_views(MODEL, TrainConfig(crop_scale=(0.5, 1.0), second_crop_scale=(0.8, 1.0), **PLAIN))(x)
    assert not (plain == 0).any()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match=r"^erase must be a finite number >= 0 and <= 1"):
            TrainConfig(erase=bad)


def test_plain_view_is_each_image_or_its_mirror():
    """build_plain: normalised, mirrored with probability 0.5, nothing else (no crop, jitter or erasing)."""
    x = torch.randint(0, 256, (200, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    got = build_plain(MODEL)(x)
    want = (x.float() / 255 - 0.5) / 0.5
    same = (got - want).abs().flatten(1).amax(1) < 1e-6
    mirrored = (got - want.flip(-1)).abs().flatten(1).amax(1) < 1e-6
    assert got.shape == x.shape and got.dtype == torch.float32
    assert (same | mirrored).all()
    assert 60 < int(mirrored.sum()) < 140  # about half are mirrored (binomial 200, 0.5: 100 +/- 7)


def test_refine_neighbor_view_is_checked():
    assert TrainConfig().refine_neighbor_view == "augmented"
    assert TrainConfig(refine_neighbor_view="plain").refine_neighbor_view == "plain"
    with pytest.raises(ConfigError, match=r"^refine_neighbor_view must be one of augmented, plain, got 'clean'"):
        TrainConfig(refine_neighbor_view="clean")


RGB = MixEMConfig(backbone="convnet", width=8, image_size=36, in_channels=3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))


def _kornias_own(aug):
    """aug's ops in kornia's AugmentationSequential, with kornia's own RandomResizedCrop (one resize per image):
    the views as kornia makes them."""
    import kornia.augmentation as K

    crop, *rest = aug.ops
    drawn = crop._param_generator  # the box ranges it draws from
    theirs = K.RandomResizedCrop(crop.flags["size"], scale=drawn.scale, ratio=drawn.ratio, p=1.0)
    return K.AugmentationSequential(theirs, *rest)


@pytest.mark.parametrize(
    ("model_cfg", "train_kw", "erase"),
    [
        (MODEL, dict(crop_scale=(0.35, 1.0)), 0.5),  # the cpu preset's kind of views: grayscale, jitter, erasing
        (MODEL, dict(crop_scale=(0.8, 1.0), jitter_p=0.0), 0.0),
        (RGB, dict(crop_scale=(0.2, 1.0), grayscale_p=0.3, blur=True), 0.25),  # colour: hue, saturation, blur
    ],
)
def test_augment_draws_as_kornias_augmentation_sequential(model_cfg, train_kw, erase):
    """_Augment chains kornia's ops itself and resizes the crops in one batch (augment.resized_crops): the same
    draws, call after call (so every op after the crop draws the same too), and the images kornia's own container
    and crop make, to float rounding."""
    aug = build_augment(model_cfg, TrainConfig(**train_kw), erase=erase)
    reference = _kornias_own(aug)
    g = torch.Generator().manual_seed(5)
    for n in (1, 7, 64):
        x = torch.randint(0, 256, (n, model_cfg.in_channels, 40, 44), dtype=torch.uint8, generator=g)
        torch.manual_seed(n)
        ours = [aug(x), aug(x)]
        torch.manual_seed(n)
        theirs = [reference(x.float() / 255.0), reference(x.float() / 255.0)]
        assert ours[0].shape == (n, model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size)
        for a, b in zip(ours, theirs):
            # normalised values: fp32 rounding of the bilinear sums, grown by hue conversion and 1 / std (5x here)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert not torch.equal(ours[0], ours[1])  # the draws differ call to call


@pytest.mark.parametrize(
    ("shape", "size"), [((9, 1, 28, 28), (28, 28)), ((5, 3, 37, 50), (24, 17)), ((4, 2, 7, 5), (9, 11))]
)
def test_resized_crops_match_torchs_interpolate_per_image(shape, size):
    """Fresh random images and boxes (one-pixel sides, the whole image, odd sizes; down- and upsampling): each crop
    as torch's bilinear interpolate (align_corners, as kornia's crop calls it) of the sliced box, to fp32 rounding."""
    g = torch.Generator().manual_seed(sum(shape))
    B, C, H, W = shape
    x = torch.rand(shape, generator=g)
    x0 = torch.randint(0, W, (B,), generator=g)
    y0 = torch.randint(0, H, (B,), generator=g)
    x1 = x0 + (torch.rand(B, generator=g) * (W - x0)).long()
    y1 = y0 + (torch.rand(B, generator=g) * (H - y0)).long()
    x0[0], y0[0], x1[0], y1[0] = 0, 0, W - 1, H - 1  # the whole image
    x1[1] = x0[1]  # one pixel wide
    boxes = torch.stack(
        [torch.stack([x0, y0], 1), torch.stack([x1, y0], 1), torch.stack([x1, y1], 1), torch.stack([x0, y1], 1)], 1
    )
    ours = resized_crops(x, boxes.float(), size)
    for i in range(B):
        crop = x[i : i + 1, :, y0[i] : y1[i] + 1, x0[i] : x1[i] + 1]
        ref = torch.nn.functional.interpolate(crop, size=size, mode="bilinear", align_corners=True)
        torch.testing.assert_close(ours[i : i + 1], ref, rtol=0, atol=1e-6)
