"""The model's output contract, the batched head against a per-component loop, configs' strictness."""

import copy

import pytest
import torch
import torch.nn.functional as F

from mixem.config import MixEMConfig, TrainConfig, from_dict, preset, replace
from mixem.errors import ConfigError
from mixem.model import InferenceModel, MixEM

TINY = dict(backbone="convnet", width=8, image_size=28, in_channels=1, head_hidden=16, mean=(0.3,), std=(0.3,))


@pytest.mark.parametrize(
    "cfg",
    [
        MixEMConfig(**TINY),
        MixEMConfig(**TINY, pool=2),
        MixEMConfig(backbone="resnet18", width=8, image_size=32, head_hidden=16, embed_dim=8, components=3),
        MixEMConfig(backbone="resnet18", width=8, image_size=32, head_hidden=16, embed_dim=8, components=3, pool=2),
        MixEMConfig(
            backbone="resnet18", width=8, image_size=96, in_channels=1, mean=(0.5,), std=(0.25,), head_hidden=8
        ),
    ],
)
def test_output_contract(cfg):
    model = MixEM(cfg).eval()
    B = 3
    out = model(torch.randn(B, cfg.in_channels, cfg.image_size, cfg.image_size))
    assert out.embedding.shape == (B, cfg.embed_dim)
    assert out.mixture_logits.shape == (B, cfg.components)
    assert out.components.shape == (B, cfg.components, cfg.embed_dim)
    assert out.features.shape == (B, model.feature_dim)
    torch.testing.assert_close(out.components.norm(dim=-1), torch.ones(B, cfg.components))
    pi = torch.softmax(out.mixture_logits, 1)
    torch.testing.assert_close(out.embedding, (pi.unsqueeze(-1) * out.components).sum(1))
    emb, probs = InferenceModel(model)(
        torch.randint(0, 256, (B, cfg.in_channels, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    )
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(B))
    torch.testing.assert_close(probs.sum(1), torch.ones(B))


def test_pool_keeps_the_cells_apart():
    """pool 2: the features are the four quadrants' averages of the last feature map (global average: their mean)."""
    torch.manual_seed(0)
    one, four = MixEM(MixEMConfig(**TINY)).eval(), MixEM(MixEMConfig(**TINY, pool=2)).eval()
    four.backbone.load_state_dict(one.backbone.state_dict())  # the same trunk: pooling has no weights
    assert (one.feature_dim, four.feature_dim) == (32, 128)  # 4 x width channels, x 4 cells
    x = torch.randn(2, 1, 28, 28)
    cells = four(x).features.view(2, 32, 2, 2)  # 7 x 7 map: cells of rows/columns 0-3 and 3-6
    fmap = one.backbone[:-2](x)
    torch.testing.assert_close(cells[:, :, 0, 1], fmap[:, :, :4, 3:].mean((2, 3)))
    torch.testing.assert_close(one(x).features, fmap.mean((2, 3)))
    assert from_dict(MixEMConfig, dict(TINY)).pool == 1  # a config.json written before `pool` existed loads as 1


def test_batched_head_equals_per_component_mlps():
    model = MixEM(MixEMConfig(**TINY)).eval()
    head = model.head
    h = torch.randn(4, model.feature_dim)
    out = head(h)
    comp, logits = out.components, out.mixture_logits
    H = head.H
    for k in range(head.K):
        w1, b1 = head.fc1.weight[k * H : (k + 1) * H], head.fc1.bias[k * H : (k + 1) * H]
        e = F.relu(h @ w1.T + b1) @ head.w2[k] + head.b2[k]
        torch.testing.assert_close(comp[:, k], F.normalize(e, dim=-1))
    g = F.relu(h @ head.fc1.weight[head.K * H :].T + head.fc1.bias[head.K * H :])
    torch.testing.assert_close(logits, head.gate2(g))


@pytest.mark.parametrize("head", ["mixture", "centers"])
@pytest.mark.parametrize("B", [1, 7, 64])
def test_class_logits_are_the_forwards_logits_with_its_gradients(head, B):
    """head.class_logits (what refine.fit_head trains on; MIX'EM's skips its components' layers) gives the full
    forward's mixture_logits, and a loss on it the same gradient for every head parameter (none, or zero, for the
    components' layers the logits do not read)."""
    torch.manual_seed(B)
    model = MixEM(MixEMConfig(**TINY, head=head, pool=2, components=5, embed_dim=8))
    h = torch.randn(B, model.feature_dim)
    target = torch.randint(0, 5, (B,))
    grads = []
    for logits_of in (lambda: model.head(h).mixture_logits, lambda: model.head.class_logits(h)):
        model.zero_grad(set_to_none=True)
        logits = logits_of()
        F.cross_entropy(logits, target).backward()
        grads.append((logits.detach(), {n: p.grad for n, p in model.head.named_parameters()}))
    (full, g_full), (alone, g_alone) = grads
    torch.testing.assert_close(alone, full, rtol=1e-6, atol=1e-6)
    for name, g in g_full.items():
        other = g_alone[name]
        if g is None or other is None:  # a parameter the logits never read: no gradient either way, or zero
            assert all(x is None or not x.any() for x in (g, other)), name
        else:
            torch.testing.assert_close(other, g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", ["mixture", "centers"])
def test_class_fit_trains_the_same_weights_as_adam_on_every_head_parameter(head):
    """head.class_fit (refine.fit_head's tensors: MIX'EM's gate rows of fc1 copied out, written back by commit)
    ends at the same head, bit for bit, as Adam over all the head's parameters on class_logits (whose step on
    the zero gradients outside the gate is exactly 0)."""
    torch.manual_seed(11)
    model = MixEM(MixEMConfig(**TINY, head=head, pool=2, components=5, embed_dim=8))
    h, target = torch.randn(300, model.feature_dim), torch.randint(0, 5, (300,))
    every, own = copy.deepcopy(model.head), copy.deepcopy(model.head)
    opt_every = torch.optim.Adam(every.parameters(), lr=1e-2)
    params, class_logits, commit = own.class_fit()
    opt_own = torch.optim.Adam(params, lr=1e-2)
    for idx in torch.randperm(300, generator=torch.Generator().manual_seed(0)).split(64) * 3:
        for opt, logits in ((opt_every, every.class_logits), (opt_own, class_logits)):
            loss = F.cross_entropy(logits(h[idx]), target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    commit()
    trained, start = every.state_dict(), model.head.state_dict()
    for name, value in own.state_dict().items():
        assert torch.equal(value, trained[name]), name
    assert not all(torch.equal(trained[name], start[name]) for name in start)  # it trained
    if head == "mixture":  # the components' layers, which the class logits never read, kept their values
        components = slice(0, -TINY["head_hidden"])  # fc1's rows before the gate's
        assert torch.equal(trained["w2"], start["w2"])
        assert torch.equal(trained["fc1.weight"][components], start["fc1.weight"][components])


def test_inference_model_normalises_inside():
    model = MixEM(MixEMConfig(**TINY)).eval()
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    emb, probs = InferenceModel(model)(x)
    out = model(model.normalize(x))
    torch.testing.assert_close(emb, F.normalize(out.embedding, dim=1))


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(backbone="vgg"), "unknown backbone"),
        (dict(components=1), "at least 2"),
        (dict(in_channels=2), "in_channels"),
        (dict(image_size=4), "image_size"),
        (dict(in_channels=1), "mean and std"),
        (dict(pool=0), "pool"),
    ],
)
def test_bad_model_config(bad, match):
    with pytest.raises(ConfigError, match=match):
        MixEMConfig(**bad)


def test_config_strict_and_presets():
    with pytest.raises(ConfigError, match="unknown field"):
        from_dict(TrainConfig, {"epochz": 3})
    with pytest.raises(ConfigError, match="unknown field"):
        replace(TrainConfig(), epochz=3)
    assert replace(TrainConfig(), epochs=None).epochs == TrainConfig().epochs  # None keeps the value
    m, t = preset("paper")
    assert (m.backbone, m.components, m.embed_dim, t.batch_size, t.lr, t.temperature) == (
        "resnet18",
        10,
        32,
        512,
        1e-4,
        0.5,
    )
    assert m.small_stem  # 32 px -> CIFAR stem
    # The paper preset trains the paper's method; the cpu preset plain SimCLR (+ refinement), measured better there
    assert (t.method, preset("cpu")[1].method) == ("mixem", "simclr")
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("fast")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    from mixem.files import atomic_write, atomic_write_text

    target = tmp_path / "sub" / "f.json"
    atomic_write_text(target, "old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]  # no temporary file left behind
