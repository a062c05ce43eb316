"""Small real checkpoints for the export tests: configs and a checkpoint maker with non-degenerate outputs."""

import torch

from mixem.checkpoint import save_checkpoint
from mixem.config import MixEMConfig
from mixem.model import InferenceModel, MixEM

SMALL = dict(backbone="convnet", width=16, image_size=28, in_channels=1, head_hidden=32, mean=(0.29,), std=(0.35,))
RESNET = dict(backbone="resnet18", width=16, image_size=32, in_channels=3, head_hidden=32)


def make_checkpoint(path, **cfg_fields):
    """A checkpoint whose outputs differ from image to image, so parity gates can fail.

    A fresh initialisation maps every Fashion-MNIST image to nearly the same output (measured: mean
    pairwise embedding cosine 0.99999, one argmax for all 256 images), which would make cosine and
    argmax agreement vacuous. Calibrating BatchNorm on real images (as training would) and sharpening
    the gate gives mean pairwise cosine ~0.8 and several mixture components in use.
    """
    from mixem.export.parity import real_images

    torch.manual_seed(0)
    cfg = MixEMConfig(**cfg_fields)
    model = MixEM(cfg)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
    x = torch.from_numpy(real_images(512, cfg.image_size, cfg.in_channels).copy())
    model.train()
    with torch.no_grad():
        InferenceModel(model)(x)
        model.head.gate2.weight.mul_(20)
        model.head.w2.mul_(3)
    model.eval()
    return save_checkpoint(path, model, cfg)
