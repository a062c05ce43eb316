"""Each loss term of the reference against hand-computed tiny cases, and float64 gradcheck."""

import math

import pytest
import torch
import torch.nn.functional as F

from mixem import losses


@pytest.mark.parametrize("tau", [0.5, 0.1])
def test_nt_xent_hand_case(tau):
    # Two images whose two views are identical and orthogonal to the other image: every row sees
    # one positive at cosine 1 and two negatives at cosine 0.
    e1, e2 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64)
    z1 = torch.stack([e1, e2])
    z2 = torch.stack([3 * e1, e2])  # scale must not matter (cosine)
    expected = math.log(2 + math.exp(1 / tau)) - 1 / tau
    assert losses.nt_xent_torch(z1, z2, tau).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_single_pair_is_zero():
    # One image: the only other row is the positive, so softmax gives it probability 1.
    z1, z2 = torch.randn(1, 8), torch.randn(1, 8)
    assert losses.nt_xent_torch(z1, z2, 0.5).item() == pytest.approx(0.0, abs=1e-6)


def test_lse_matches_definition():
    z = F.normalize(torch.randn(7, 5, dtype=torch.float64), dim=1)
    tau = 0.3
    lse = losses.ntxent_lse_torch(z, tau)
    for i in range(7):
        others = [math.exp(float(z[i] @ z[k]) / tau) for k in range(7) if k != i]
        assert lse[i].item() == pytest.approx(math.log(sum(others)), rel=1e-12)


def test_positive_logits_need_even_rows():
    with pytest.raises(ValueError, match="even number"):
        losses.positive_logits_torch(torch.randn(5, 3), 0.5)


def test_mixture_terms_uniform_and_confident():
    t = losses.mixture_terms_torch(torch.zeros(3, 4))
    assert t["marginal_entropy"].item() == pytest.approx(math.log(4))
    assert t["instance_entropy"].item() == pytest.approx(math.log(4))
    assert t["pimax"].item() == pytest.approx(0.75)
    t = losses.mixture_terms_torch(torch.tensor([[60.0, 0.0], [0.0, 60.0]]))
    assert t["marginal_entropy"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert t["instance_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert t["pimax"].item() == pytest.approx(0.0, abs=1e-6)
    # All instances confident in the same component: marginal entropy collapses to 0.
    t = losses.mixture_terms_torch(torch.tensor([[60.0, 0.0], [60.0, 0.0]]))
    assert t["marginal_entropy"].item() == pytest.approx(0.0, abs=1e-6)


def test_pull_push_hand_case_with_empty_component():
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 5.0]])
    assign = torch.tensor([0, 0, 1, 1])
    pull, push = losses.pull_push_torch(z, assign, K=3)  # component 2 is empty and ignored
    assert pull.item() == pytest.approx(1.0)
    assert push.item() == pytest.approx(-math.sqrt(17), rel=1e-6)


def test_pull_push_single_component_has_no_push():
    z = torch.randn(4, 3, requires_grad=True)
    pull, push = losses.pull_push_torch(z, torch.zeros(4, dtype=torch.long), K=5)
    assert push.item() == 0.0
    (pull + push).backward()
    assert torch.isfinite(z.grad).all()


def test_gradcheck_float64():
    z1 = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: losses.nt_xent_torch(a, b, 0.3), (z1, z2))
    logits = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    for key in ("marginal_entropy", "instance_entropy", "pimax"):
        assert torch.autograd.gradcheck(lambda a, key=key: losses.mixture_terms_torch(a)[key], (logits,))
    z = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    assign = torch.tensor([0, 1, 1, 2, 0, 2, 1, 0])
    assert torch.autograd.gradcheck(lambda a: torch.stack(losses.pull_push_torch(a, assign, 4)), (z,))


# Refinement losses (mixem.refine)


def test_neighbor_consistency_hand_case():
    # p = (1/2, 1/2) and q = (1, 0) (up to exp(-40)): <p, q> = 1/2; identical one-hot rows: <p, q> = 1.
    a = torch.tensor([[0.0, 0.0], [40.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[40.0, 0.0], [40.0, 0.0]], dtype=torch.float64)
    expected = -(math.log(0.5) + math.log(1.0)) / 2
    assert losses.neighbor_consistency_torch(a, b).item() == pytest.approx(expected, abs=1e-12)
    # Equals -mean log <p, q> computed directly on random logits, and stays finite where <p, q> underflows.
    a, b = torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    direct = -torch.log((torch.softmax(a, 1) * torch.softmax(b, 1)).sum(1)).mean()
    assert losses.neighbor_consistency_torch(a, b).item() == pytest.approx(direct.item(), rel=1e-12)
    far = losses.neighbor_consistency_torch(torch.tensor([[2000.0, 0.0]]), torch.tensor([[0.0, 2000.0]]))
    assert far.item() == pytest.approx(2000.0 - math.log(2.0), rel=1e-6)  # <p, q> = 2 exp(-2000)


def test_balanced_cross_entropy_hand_case():
    # Targets 0, 0, 0, 1: class 0 gets weight 4/3 per image, class 1 weight 4; normalised by the total weight
    # (3 * 4/3 + 4 = 8), each class contributes half of the loss whatever its count.
    logits = torch.randn(4, 3, dtype=torch.float64)
    target = torch.tensor([0, 0, 0, 1])
    nll = -torch.log_softmax(logits, 1)[torch.arange(4), target]
    expected = (nll[:3].sum() * 4 / 3 + nll[3] * 4) / 8
    got = losses.balanced_cross_entropy_torch(logits, target, 3)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    assert got.item() == pytest.approx(0.5 * nll[:3].mean().item() + 0.5 * nll[3].item(), rel=1e-12)
    # No confident image: zero, and backward still works (a no-op step).
    empty = losses.balanced_cross_entropy_torch(logits[:0].requires_grad_(), target[:0], 3)
    empty.backward()
    assert empty.item() == 0.0


def test_refinement_gradcheck_float64():
    a = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(losses.neighbor_consistency_torch, (a, b))
    target = torch.tensor([0, 2, 2, 3, 0, 0])
    assert torch.autograd.gradcheck(lambda x: losses.balanced_cross_entropy_torch(x, target, 4), (a,))
    # The documented closed-form gradient of the consistency term: (p - r) / B, r = p * q / <p, q>.
    loss = losses.neighbor_consistency_torch(a, b)
    (ga,) = torch.autograd.grad(loss, a)
    p, q = torch.softmax(a, 1), torch.softmax(b, 1)
    r = p * q / (p * q).sum(1, keepdim=True)
    torch.testing.assert_close(ga, (p - r) / 6)
