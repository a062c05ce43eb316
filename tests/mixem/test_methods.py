"""The method registry: a new method is one objective function plus one registry line, and it trains."""

import json

import pytest
import torch
import torch.nn.functional as F

from mixem import losses, methods
from mixem.config import MixEMConfig, TrainConfig
from mixem.errors import ConfigError
from mixem.session import build_configs
from mixem.training import train

TINY_MODEL = dict(backbone="convnet", width=8, image_size=28, in_channels=1, head_hidden=16, mean=(0.29,), std=(0.35,))


def align_objective(o1, o2, cfg, ctx):
    """A made-up method: NT-Xent plus the mean squared distance between the two views' unit embeddings."""
    ntxent = losses.nt_xent_torch(o1.embedding, o2.embedding, cfg.temperature)
    align = (F.normalize(o1.embedding, dim=1) - F.normalize(o2.embedding, dim=1)).pow(2).sum(1).mean()
    return {"ntxent": ntxent, "align": align, "loss": ntxent + 0.5 * align}


@pytest.fixture
def align_method():
    m = methods.register(methods.Method("align", "Align", "centers", align_objective, "kmeans++", "k-means++ on z"))
    yield m
    methods.REGISTRY.pop("align")


def test_a_registered_method_trains_and_logs_its_terms(align_method, tmp_path):
    from mixem.data import load_images

    images = load_images(None, image_size=28, in_channels=1, max_images=256).images
    model_cfg, train_cfg, _ = build_configs(
        "cpu", None, TINY_MODEL, dict(method="align", epochs=2, batch_size=64, out=str(tmp_path / "run"), device="cpu")
    )
    assert model_cfg.head == "centers"  # the registry's head, picked by --method alone
    model, result = train(model_cfg, train_cfg, images)
    assert [set(r) >= {"ntxent", "align", "loss"} for r in result.history] == [True, True]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["method"] == "align"


def test_every_builtin_method_names_a_known_head_and_objective():
    from mixem.config import HEADS
    from mixem.model import HEAD_TYPES

    assert set(methods.REGISTRY) >= {"mixem", "simclr", "ccp"}
    for m in methods.REGISTRY.values():
        assert m.head in HEADS and m.head in HEAD_TYPES and m.headline_init in ("mixture", "kmeans++")
        assert callable(m.objective_fn())


def test_unknown_method_and_wrong_head_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown method 'nope': choose one of mixem, simclr, ccp"):
        TrainConfig(method="nope")
    images = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="method ccp needs head 'centers'"):
        train(MixEMConfig(**TINY_MODEL), TrainConfig(method="ccp", batch_size=32, epochs=1, out=str(tmp_path)), images)


def test_the_cpu_preset_gives_ccp_the_global_pool_unless_the_run_sets_one(tmp_path):
    """The preset's per-method settings apply under fields the run leaves alone; a config file or option wins."""
    pools = {m: build_configs("cpu", None, {}, {"method": m, "data": None})[0].pool for m in methods.REGISTRY}
    assert pools == {"mixem": 2, "simclr": 2, "ccp": 1}
    cfg = tmp_path / "pool.json"
    cfg.write_text(json.dumps({"model": {"pool": 2}}))
    assert build_configs("cpu", cfg, {}, {"method": "ccp", "data": None})[0].pool == 2
    assert build_configs("paper", None, {}, {"method": "ccp", "data": None})[0].pool == 1  # the paper preset as written
