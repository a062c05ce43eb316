"""Backbone trunks: torchvision ResNets (small-image stem when asked) and a small CPU convnet."""

from __future__ import annotations

from torch import nn

from mixem.config import MixEMConfig


def _convnet(in_ch: int, width: int, pool: int = 1) -> tuple[nn.Module, int]:
    """Three stages of two 3x3 conv-BN-ReLU blocks, halving resolution between them; an average pool to
    pool x pool cells (1: global), flattened.

    Sized for 2 CPU cores on 28-32 px images: width 32 is ~0.3 M parameters, ~40 MFLOP per 28 px image.
    """

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    w = width
    layers = [
        *block(in_ch, w),
        *block(w, w),
        nn.MaxPool2d(2),
        *block(w, 2 * w),
        *block(2 * w, 2 * w),
        nn.MaxPool2d(2),
        *block(2 * w, 4 * w),
        *block(4 * w, 4 * w),
        nn.AdaptiveAvgPool2d(pool),
        nn.Flatten(),
    ]
    return nn.Sequential(*layers), 4 * w * pool * pool


def _resnet(cfg: MixEMConfig) -> tuple[nn.Module, int]:
    import torchvision

    # torchvision's constructors fix the stem width at 64; other widths scale every stage.
    net = getattr(torchvision.models, cfg.backbone)(weights=None) if cfg.width == 64 else _scaled_resnet(cfg)
    if cfg.small_stem:
        # CIFAR stem (MIX'EM's conv1_k3, SimCLR appendix): keep resolution for <= 64 px inputs.
        net.conv1 = nn.Conv2d(cfg.in_channels, net.conv1.out_channels, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif cfg.in_channels != 3:
        net.conv1 = nn.Conv2d(cfg.in_channels, net.conv1.out_channels, 7, 2, 3, bias=False)
    feat = net.fc.in_features * cfg.pool * cfg.pool  # torchvision's forward flattens the pool's cells
    net.avgpool = nn.AdaptiveAvgPool2d(cfg.pool)
    net.fc = nn.Identity()
    return net, feat


def _scaled_resnet(cfg: MixEMConfig) -> nn.Module:
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    spec = {
        "resnet18": (BasicBlock, [2, 2, 2, 2]),
        "resnet34": (BasicBlock, [3, 4, 6, 3]),
        "resnet50": (Bottleneck, [3, 4, 6, 3]),
    }[cfg.backbone]

    class _ScaledResNet(ResNet):
        def __init__(self):
            super().__init__(*spec)
            self.inplanes = cfg.width
            self.conv1 = nn.Conv2d(3, cfg.width, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(cfg.width)
            w = cfg.width
            self.layer1 = self._make_layer(spec[0], w, spec[1][0])
            self.layer2 = self._make_layer(spec[0], 2 * w, spec[1][1], stride=2)
            self.layer3 = self._make_layer(spec[0], 4 * w, spec[1][2], stride=2)
            self.layer4 = self._make_layer(spec[0], 8 * w, spec[1][3], stride=2)
            self.fc = nn.Linear(8 * w * spec[0].expansion, 1)

    return _ScaledResNet()


def build_backbone(cfg: MixEMConfig) -> tuple[nn.Module, int]:
    """The trunk for cfg and its output feature width F: trunk(x (B,C,H,W)) -> (B, F)."""
    if cfg.backbone == "convnet":
        return _convnet(cfg.in_channels, cfg.width, cfg.pool)
    return _resnet(cfg)
