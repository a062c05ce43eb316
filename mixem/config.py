"""The two config dataclasses (model and run), their presets, and strict JSON round-tripping."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any

from mixem import methods
from mixem.errors import ConfigError
from mixem.files import read_json

# Every choice list lives here (a light module), so the CLI offers them without importing torch.
BACKBONES = ("convnet", "resnet18", "resnet34", "resnet50")
HEADS = ("mixture", "centers")  # model heads; each method names its own (mixem.methods); methods are listed there
INSTANCE_TERMS = ("entropy", "pimax")
IMPLS = ("auto", "triton", "torch")  # loss implementations (mixem.objectives.resolve_impl)
EXPORT_FORMATS = ("onnx", "trt")  # mixem.export.export_checkpoint
ENGINES = ("torch", "onnx", "trt")  # mixem.engines.load_engine
FEATURE_TYPES = ("backbone", "embedding", "top_component")  # released cluster_eval.py: rep, fc, fcmax
EMBED_FEATURES = ("embedding", "backbone")  # what `embed` stores
KMEANS_INITS = ("mixture", "kmeans++", "random")  # k-means starts of eval and cluster
KMEANS_SEEDINGS = ("kmeans++", "random")  # the inits that draw points (mixture starts from the model's groups)
KMEANS_BACKENDS = ("auto", "faiss", "torch")  # mixem.kmeans.resolve_backend
EVAL_FEATURES = ("backbone", "embedding")  # what `eval` clusters unless told otherwise
EVAL_INITS = ("mixture", "kmeans++")  # and from which starts
OPTIMIZERS = ("adam", "adamw")
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")  # auto = bf16 autocast on CUDA, fp32 on the CPU
ENGINE_PRECISIONS = ("auto", "fp32", "fp16", "bf16")  # the torch engine; auto = fp16 on CUDA, fp32 on the CPU
DATA_FORMATS = ("folder", "npz", "idx", "cifar10", "cifar100", "cifar100-20", "stl10")  # mixem.data
SPLITS = ("auto", "train", "test", "all", "unlabeled")
DECODERS = ("auto", "pil", "nvjpeg")  # embed: auto = nvjpeg on a CUDA engine, else pil
TRT_PROFILE = (1, 64, 256)  # TensorRT batch profile: min, opt, max


@dataclass
class MixEMConfig:
    """What rebuilds the model: saved as config.json beside every set of weights."""

    backbone: str = "resnet18"  # one of BACKBONES; "convnet" is the small CPU trunk
    width: int = 64  # channels of the first stage (resnet18/34: 64 is torchvision's; convnet: any)
    image_size: int = 32  # square input side in pixels; inputs are resized to it when loaded
    in_channels: int = 3  # 1 = grayscale stem, 3 = RGB (grayscale data is replicated to 3)
    small_stem: bool | None = None  # 3x3/stride-1 conv, no max-pool; None = image_size <= 64
    head_hidden: int = 512  # hidden width of each component MLP and of the gate MLP
    embed_dim: int = 32  # D: dimension of each component embedding and of the mixture
    components: int = 10  # K: mixture components (MIX'EM: the number of classes sought)
    head: str = "mixture"  # one of HEADS: "mixture" (MIX'EM) | "centers" (ccp: embedding + cluster-center predictor)
    # tau_c of the centers head, logits z.c_k / tau_c: in the model config, not the run's, because the
    # probabilities that export and embed return depend on it. 0.1: cosines span [-1, 1], so logits
    # span +-10 and an image near one centre can get a confident assignment (SwAV/PCL prototypes use 0.1).
    center_temperature: float = 0.1
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # per-channel mean of pixels in [0,1], applied in the graph
    std: tuple[float, ...] = (0.25, 0.25, 0.25)  # per-channel std, applied in the graph

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ConfigError(f"unknown backbone {self.backbone!r}: choose one of {', '.join(BACKBONES)}")
        if self.components < 2:
            raise ConfigError(f"components (K) must be at least 2, got {self.components}")
        if self.head not in HEADS:
            raise ConfigError(f"unknown head {self.head!r}: choose one of {', '.join(HEADS)}")
        if not self.center_temperature > 0:
            raise ConfigError(f"center_temperature must be > 0, got {self.center_temperature}")
        if self.in_channels not in (1, 3):
            raise ConfigError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.image_size < 8:
            raise ConfigError(f"image_size must be at least 8 pixels, got {self.image_size}")
        if self.embed_dim < 2 or self.head_hidden < 1 or self.width < 1:
            raise ConfigError("embed_dim must be >= 2 and head_hidden, width >= 1")
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ConfigError(f"mean and std need {self.in_channels} values (one per input channel)")
        if self.small_stem is None:
            self.small_stem = self.image_size <= 64


@dataclass
class TrainConfig:
    """One training run: data, schedule, optimiser, loss weights. Saved as train_config.json."""

    data: str | None = None  # image folder, .npz, IDX, CIFAR or STL-10 path; None = embedded Fashion-MNIST
    split: str = "auto"  # which split of a standard dataset: train | test | all | auto (all there is)
    out: str = "runs/mixem"  # output directory: checkpoints, logs, metrics
    method: str = "mixem"  # a name in mixem.methods.REGISTRY: mixem | simclr | ccp (cluster-center predictor)
    epochs: int = 200  # passes over the data
    batch_size: int = 512  # B images per step (2B views)
    optimizer: str = "adam"  # adam | adamw
    lr: float = 1e-4  # peak learning rate
    weight_decay: float = 1e-5  # L2 (adam) or decoupled (adamw) weight decay
    warmup_epochs: float = 10.0  # linear warm-up length before the cosine decay, in epochs
    temperature: float = 0.5  # tau of NT-Xent (cosine similarity / tau)
    w_marginal: float = 2.0  # (i) weight of the maximised batch-marginal entropy of pi
    w_instance: float = 0.1  # (ii) weight of the minimised per-instance term
    instance_term: str = "pimax"  # (ii) "entropy" = H(pi_i); "pimax" = 1 - max pi_i (released code)
    w_pull: float = 0.1  # (iii) weight of pulling embeddings to their component mean
    w_push: float = 0.05  # (iii) weight of pushing component means apart
    # ccp only (README "The second method (ccp)"); loss = NT-Xent + w_cluster * cluster + w_anchor * anchor
    w_cluster: float = 1.0  # weight of the clustering loss (cross-view consistency - w_balance * balance)
    w_balance: float = (
        2.0  # weight of the batch-marginal entropy H(mean_i p_i) in it: without it all images join one cluster
    )
    sharpen: float = 0.5  # T: a view's target is softmax(logits / T), T < 1 sharpens it (MixMatch's T)
    w_anchor: float = 1.0  # weight of the anchor loss (centres toward their soft cluster means + separation)
    anchor_temperature: float = 0.5  # tau_a of the centre separation (uniformity) term
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random resized crop area range
    color_jitter: float = 0.8  # jitter strength s (brightness/contrast/saturation 0.8s... as SimCLR)
    jitter_p: float = 0.8  # probability of colour jitter
    grayscale_p: float = 0.2  # probability of random grayscale (RGB only)
    blur: bool | None = None  # gaussian blur; None = on for images >= 64 px (SimCLR)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile the model
    impl: str = "auto"  # loss kernels: auto (Triton on CUDA) | triton | torch
    seed: int = 0  # seeds torch, numpy and the augmentation stream
    threads: int = 0  # CPU threads for torch; 0 = leave torch's default
    eval_every: int = 0  # epochs between in-training clustering evaluations; 0 = only at the end
    max_images: int = 0  # use only the first N images of the data (quick runs); 0 = all
    # Refinement (README "Refinement"): after the representation, the head's K-way softmax becomes the classes.
    refine: bool = True  # run the two refinement stages after representation learning
    refine_neighbors: int = 20  # nearest neighbours mined per image (exact search on the L2-normalised embedding)
    refine_epochs: int = 30  # epochs of the neighbour-consistency stage
    refine_lr: float = 1e-4  # its learning rate (Adam(W) as --optimizer, --weight-decay)
    refine_entropy: float = 5.0  # weight of the batch-marginal entropy that keeps every class in use
    refine_backbone: bool = True  # train the backbone too in the neighbour stage (False: the head only)
    selflabel_epochs: int = 30  # epochs of self-labelling (the whole network)
    selflabel_threshold: float = 0.99  # class probability an image needs to become a pseudo-label
    selflabel_share: float = 0.5  # ... or rank in this top share of the images of its class (every class keeps some)
    selflabel_lr: float = 1e-4
    refine_batch_size: int = 0  # images per step of both stages; 0 = --batch-size

    def __post_init__(self):
        methods.get(self.method)  # a one-line error naming the registered methods
        if self.instance_term not in INSTANCE_TERMS:
            raise ConfigError(f"instance_term must be one of {', '.join(INSTANCE_TERMS)}, got {self.instance_term!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.impl not in IMPLS:
            raise ConfigError(f"impl must be one of {', '.join(IMPLS)}, got {self.impl!r}")
        if self.precision not in TRAIN_PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(TRAIN_PRECISIONS)}, got {self.precision!r}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ConfigError("epochs must be >= 1 and batch_size >= 2")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not (self.sharpen > 0 and self.anchor_temperature > 0):
            raise ConfigError(
                f"sharpen and anchor_temperature must be > 0, got {self.sharpen}, {self.anchor_temperature}"
            )
        if self.refine_neighbors < 1 or self.refine_epochs < 0 or self.selflabel_epochs < 0:
            raise ConfigError("refine_neighbors must be >= 1, refine_epochs and selflabel_epochs >= 0")
        if not 0 <= self.selflabel_share <= 1:
            raise ConfigError(f"selflabel_share must be between 0 and 1, got {self.selflabel_share}")
        if not 0 < self.selflabel_threshold < 1:
            raise ConfigError(f"selflabel_threshold must be between 0 and 1, got {self.selflabel_threshold}")
        if self.refine_batch_size < 0 or self.refine_batch_size == 1:
            raise ConfigError(f"refine_batch_size must be 0 (= batch_size) or >= 2, got {self.refine_batch_size}")
        self.crop_scale = tuple(float(c) for c in self.crop_scale)
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"crop_scale must be two numbers 0 < lo <= hi <= 1, got {self.crop_scale}")


# Presets are named sets of field overrides, applied before the user's own overrides.
# "paper": the released MIX'EM recipe (alivaramesh/MIXEM): ResNet-18, K=10, D=32, Adam 1e-4, bs 512, 200 ep.
# "cpu": chosen for ~3 minutes on 2 CPU cores on 28 px grayscale images (README, "CPU recipe").
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {"model": {}, "train": {}},
    "cpu": {
        "model": dict(
            backbone="convnet",
            width=16,
            image_size=28,
            in_channels=1,
            head_hidden=128,
            embed_dim=32,
            components=10,
            mean=(0.29,),
            std=(0.35,),
        ),
        "train": dict(
            epochs=12,
            batch_size=128,
            optimizer="adamw",
            lr=4e-3,
            weight_decay=1e-4,
            warmup_epochs=1.0,
            temperature=0.5,
            crop_scale=(0.35, 1.0),
            color_jitter=0.5,
            jitter_p=0.8,
            grayscale_p=0.0,
            blur=False,
            refine_lr=3e-3,
            refine_epochs=10,
            selflabel_epochs=0,  # measured to lower ACC at this budget (README "Refinement")
        ),
    },
}


def _check_keys(cls, data: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}")


# Fields that runs written by earlier versions saved and this version no longer has: dropped on reading,
# so those runs stay loadable, never an error.
RETIRED_FIELDS = {"TrainConfig": ("workers",)}


def from_dict(cls, data: dict, where: str = "config"):
    """Build a config dataclass from a dict, refusing unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if k not in RETIRED_FIELDS.get(cls.__name__, ())}
    _check_keys(cls, data, where)
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return cls(**kw)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def replace(cfg, where: str = "options", **overrides):
    """A copy of cfg with the non-None overrides applied (CLI options default to None = keep)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    _check_keys(type(cfg), overrides, where)
    return dataclasses.replace(cfg, **overrides)


def preset(name: str) -> tuple[MixEMConfig, TrainConfig]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    return MixEMConfig(**p["model"]), TrainConfig(**p["train"])


def to_dict(cfg) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def load_json(cls, path: str | os.PathLike):
    return from_dict(cls, read_json(path), where=str(path))
