"""The fused NT-Xent LSE op and loss against the reference in mixem.losses (interpreter on CPU, compiled on GPU)."""

import pytest
import torch
import torch.nn.functional as F

from mixem.errors import MixEMError
from mixem.kernels import nt_xent, nt_xent_triton, ntxent_lse_rows_triton, ntxent_lse_triton
from mixem.losses import nt_xent_torch, ntxent_lse_rows_torch, ntxent_lse_torch

HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
TAUS = [0.05, 0.5, 1.0]


def _leaf(t, dtype, device):
    return t.to(device=device, dtype=dtype).detach().requires_grad_()


def _lse_and_grad(fn, z, g):
    z = z.detach().clone().requires_grad_()
    lse = fn(z)
    (lse * g.to(lse.dtype)).sum().backward()
    return lse, z.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("D", [16, 17, 128])
@pytest.mark.parametrize("M", [2, 6, 37, 130, 256])
def test_lse_matches_reference(M, D, tau, dtype, device, assert_close):
    z = F.normalize(torch.randn(M, D, device=device), dim=1).to(dtype)  # (M, D)
    g = torch.randn(M, device=device)  # (M,) upstream gradient, not 1
    lse, dz = _lse_and_grad(lambda t: ntxent_lse_triton(t, tau), z, g)
    assert lse.dtype == torch.float32 and dz.dtype == dtype
    ref_lse, ref_dz = _lse_and_grad(lambda t: ntxent_lse_torch(t, tau), z.double(), g)
    low_lse, low_dz = _lse_and_grad(lambda t: ntxent_lse_torch(t, tau), z, g)
    assert_close(lse, ref_lse, low_lse, dtype, "lse", exact_inputs=True)
    assert_close(dz, ref_dz, low_dz, dtype, "dlse/dz")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("D", [16, 17, 128])
@pytest.mark.parametrize("B", [1, 3, 65, 128])
def test_nt_xent_matches_reference(B, D, tau, dtype, device, assert_close):
    z1, z2 = torch.randn(2, B, D, device=device).to(dtype)  # (B, D) each, not normalised: the loss does it
    g = torch.randn((), device=device)

    def run(fn, a, b):
        a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        loss = fn(a, b, tau)
        (loss * g.to(loss.dtype)).backward()
        return loss, a.grad, b.grad

    out = run(nt_xent_triton, z1, z2)
    ref = run(nt_xent_torch, z1.double(), z2.double())
    low = run(nt_xent_torch, z1, z2)
    # Each row's gradient is a difference of two terms of size ~2|g|/(2B·τ) (lse and positive logit);
    # at B = 1 they cancel exactly, so the fp16 budget is set by their size, not by the zero result.
    term = 2 * abs(g.item()) / (2 * B * tau)
    for what, o, r, lo, scale in zip(("loss", "dz1", "dz2"), out, ref, low, (None, term, term)):
        assert_close(o, r, lo, dtype, what, scale)


@pytest.mark.parametrize("M, D, offsets", [(37, 17, [0, 20]), (130, 128, [0, 64]), (6, 16, [0, 3])])
def test_rows_against_gathered_columns_split_in_two_ranks(M, D, offsets, device, assert_close):
    """Two "ranks" in one process: each takes its rows against the gathered matrix; the summed
    gradients (row term to its own rows, column term through the gather) equal the single-matrix ones."""
    tau = 0.3
    z = F.normalize(torch.randn(M, D, device=device), dim=1)
    g = torch.randn(M, device=device)
    ref_lse, ref_dz = _lse_and_grad(lambda t: ntxent_lse_torch(t, tau), z.double(), g)
    z_rows, z_all = z.clone().requires_grad_(), z.clone().requires_grad_()
    bounds = offsets + [M]
    lse = torch.cat([ntxent_lse_rows_triton(z_rows[a:b], z_all, a, tau) for a, b in zip(bounds, bounds[1:])])
    (lse * g).sum().backward()
    assert_close(lse, ref_lse, what="lse")
    assert_close(z_rows.grad + z_all.grad, ref_dz, what="row term + column term")
    # The single-matrix op is the special case rows = all, offset 0.
    one = ntxent_lse_rows_triton(z, z, 0, tau)
    assert_close(one, ref_lse, what="rows op on the whole matrix")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [17, 128])
@pytest.mark.parametrize("M, R, offset", [(37, 5, 31), (130, 64, 66), (130, 65, 0), (6, 3, 3)])
def test_rows_op_matches_rows_reference(M, R, offset, D, dtype, device, assert_close):
    """Rows at any offset (a rank's view-2 rows sit at B_global + rank·B), gradients to both inputs."""
    tau = 0.2
    z_all = F.normalize(torch.randn(M, D, device=device), dim=1).to(dtype)  # (M, D)
    z_rows = z_all[offset : offset + R].clone()  # (R, D)
    g = torch.randn(R, device=device)

    def run(fn, rows, cols):
        rows, cols = rows.detach().clone().requires_grad_(), cols.detach().clone().requires_grad_()
        lse = fn(rows, cols, offset, tau)
        (lse * g.to(lse.dtype)).sum().backward()
        return lse, rows.grad, cols.grad

    out = run(ntxent_lse_rows_triton, z_rows, z_all)
    ref = run(ntxent_lse_rows_torch, z_rows.double(), z_all.double())
    low = run(ntxent_lse_rows_torch, z_rows, z_all)
    for what, o, r, lo in zip(("lse", "d rows", "d all"), out, ref, low):
        assert_close(o, r, lo, dtype, what, exact_inputs=what == "lse")


@pytest.mark.parametrize("M, D", [(37, 17), (130, 40)])
def test_many_small_tiles(M, D, device, monkeypatch, assert_close):
    """16 x 16 tiles: ragged last tiles, the diagonal inside later tiles, many online-max rescales."""
    cfg = nt_xent._config
    monkeypatch.setattr(nt_xent, "_config", lambda *args: {**cfg(*args), "BM": 16, "BN": 16})
    tau = 0.1
    z = F.normalize(torch.randn(M, D, device=device), dim=1)
    g = torch.randn(M, device=device)
    ref = _lse_and_grad(lambda t: ntxent_lse_torch(t, tau), z.double(), g)
    for what, o, r in zip(("lse", "dz"), _lse_and_grad(lambda t: ntxent_lse_triton(t, tau), z, g), ref):
        assert_close(o, r, what=what)
    z_rows, z_all = z[:21].clone().requires_grad_(), z.clone().requires_grad_()
    lse = ntxent_lse_rows_triton(z_rows, z_all, 0, tau)
    rest = ntxent_lse_rows_triton(z_all[21:].detach(), z_all.detach(), 21, tau)
    assert_close(torch.cat([lse, rest]), ref[0], what="rows lse")
    (lse * g[:21]).sum().backward()
    ref_part = _lse_and_grad(lambda t: ntxent_lse_torch(t, tau)[:21], z.double(), g[:21])[1]
    assert_close(torch.cat([z_rows.grad, torch.zeros_like(z[21:])]) + z_all.grad, ref_part, what="rows dz")


def test_gradcheck_float64(device):
    z = torch.randn(6, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ntxent_lse_triton(t, 0.7), (z,), fast_mode=True)
    z_all = torch.randn(7, 5, dtype=torch.float64, device=device, requires_grad=True)
    z_rows = torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, a: ntxent_lse_rows_triton(r, a, 2, 0.7), (z_rows, z_all), fast_mode=True)
    z1, z2 = torch.randn(2, 3, 5, dtype=torch.float64, device=device).unbind(0)
    z1.requires_grad_(), z2.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: nt_xent_triton(a, b, 0.5), (z1, z2), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_finite_at_low_temperature(dtype, device):
    """τ = 0.05 with near-duplicate views (logits near 1/τ = 20) and large unnormalised rows for the raw op."""
    B, D = 65, 17
    z1 = torch.randn(B, D, device=device)
    z2 = z1 + 1e-3 * torch.randn(B, D, device=device)
    z1, z2 = _leaf(z1, dtype, device), _leaf(z2, dtype, device)
    loss = nt_xent_triton(z1, z2, 0.05)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()
    big = (30 * torch.randn(40, 16, device=device)).requires_grad_()  # logits up to ~ 3e5
    lse = ntxent_lse_triton(big, 0.05)
    (lse * torch.randn(40, device=device)).sum().backward()
    assert torch.isfinite(lse).all() and torch.isfinite(big.grad).all()
    torch.testing.assert_close(lse.double(), ntxent_lse_torch(big.detach().double(), 0.05), atol=0.0, rtol=1e-5)


def test_symmetric_under_swapping_views(device):
    z1, z2 = torch.randn(2, 37, 17, device=device).unbind(0)
    torch.testing.assert_close(nt_xent_triton(z1, z2, 0.2), nt_xent_triton(z2, z1, 0.2), atol=1e-6, rtol=1e-6)


def test_equivariant_under_batch_permutation(device):
    B, D, tau = 37, 17, 0.2
    z1, z2 = torch.randn(2, B, D, device=device).unbind(0)
    perm = torch.randperm(B, device=device)
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    b1, b2 = z1[perm].clone().requires_grad_(), z2[perm].clone().requires_grad_()
    la, lb = nt_xent_triton(a1, a2, tau), nt_xent_triton(b1, b2, tau)
    torch.testing.assert_close(la, lb, atol=1e-6, rtol=1e-6)
    (la + lb).backward()
    torch.testing.assert_close(a1.grad[perm], b1.grad, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(a2.grad[perm], b2.grad, atol=1e-7, rtol=1e-5)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    p = torch.randperm(2 * B, device=device)
    torch.testing.assert_close(ntxent_lse_triton(z[p], tau), ntxent_lse_triton(z, tau)[p], atol=1e-5, rtol=1e-6)


def test_opcheck(device):
    z = F.normalize(torch.randn(37, 17, device=device), dim=1).requires_grad_()
    torch.library.opcheck(torch.ops.mixem.ntxent_lse.default, (z, 0.5))
    torch.library.opcheck(
        torch.ops.mixem.ntxent_lse_rows.default, (z[:20].detach().requires_grad_(), z.detach().requires_grad_(), 0, 0.5)
    )
    zd = z.detach()
    lse = ntxent_lse_triton(zd, 0.5)
    torch.library.opcheck(torch.ops.mixem.ntxent_lse_bwd.default, (torch.randn(37, device=device), zd, lse, 0.5))
    torch.library.opcheck(
        torch.ops.mixem.ntxent_lse_rows_bwd.default, (torch.randn(20, device=device), zd[:20], zd, lse[:20], 0, 0.5)
    )


def test_torch_compile(device):
    z1, z2 = torch.randn(2, 37, 17, device=device).unbind(0)
    compiled = torch.compile(
        nt_xent_triton, backend="aot_eager" if device.type == "cpu" else "inductor", fullgraph=True
    )
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = compiled(a1, a2, 0.5)
    loss.backward()
    r1, r2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ref = nt_xent_triton(r1, r2, 0.5)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(a1.grad, r1.grad)
    torch.testing.assert_close(a2.grad, r2.grad)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_equals_pytorch_metric_learning_ntxent(tau, device):
    """An independent implementation: positives are the two views of each image, every other row a negative."""
    losses = pytest.importorskip("pytorch_metric_learning.losses", reason="pip install pytorch-metric-learning")
    B, D = 37, 17
    z1, z2 = torch.randn(2, B, D, device=device, dtype=torch.float64).unbind(0)
    labels = torch.arange(B, device=device).repeat(2)  # (2B,)
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ours = nt_xent_triton(a1.float(), a2.float(), tau)
    ours.backward()
    p1, p2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    peer = losses.NTXentLoss(temperature=tau)(torch.cat([p1, p2]), labels)
    peer.backward()
    torch.testing.assert_close(ours.double(), peer, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a1.grad, p1.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(a2.grad, p2.grad, atol=1e-6, rtol=1e-4)


def test_errors_are_one_line_mixem_errors(device):
    with pytest.raises(MixEMError, match="D <= 256"):
        ntxent_lse_triton(torch.randn(8, 257, device=device), 0.5)
    with pytest.raises(MixEMError, match="outside"):
        ntxent_lse_rows_triton(torch.randn(4, 8, device=device), torch.randn(6, 8, device=device), 3, 0.5)
    with pytest.raises(MixEMError, match="float16/bfloat16/float32/float64"):
        ntxent_lse_triton(torch.randint(0, 3, (8, 8), device=device), 0.5)
    with pytest.raises(MixEMError, match="learnable"):
        nt_xent_triton(
            torch.randn(4, 8, device=device), torch.randn(4, 8, device=device), torch.tensor(0.5, requires_grad=True)
        )


@pytest.mark.skipif(HAS_CUDA, reason="the bf16 refusal is for the CPU interpreter only")
def test_bf16_in_interpreter_says_it_needs_a_gpu():
    with pytest.raises(MixEMError, match="bfloat16 needs a GPU") as e:
        nt_xent_triton(torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(4, 16, dtype=torch.bfloat16), 0.5)
    assert "\n" not in str(e.value)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [32, 128])
def test_peak_memory_stays_linear_in_rows(D):
    """Fused forward + backward at M = 16384 stays O(M·D): the eager path's M² fp32 matrix alone is 1 GiB."""
    M, dev = 16384, torch.device("cuda")
    z = F.normalize(torch.randn(M, D, device=dev), dim=1).to(torch.bfloat16).requires_grad_()
    g = torch.randn(M, device=dev)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    (ntxent_lse_triton(z, 0.1) * g).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # lse, dlse and its scaled copy (3·M fp32) + dZ (M·D bf16) + allocator slack; far below M²·4 bytes.
    assert extra < 3 * M * 4 + 2 * M * D * 2 + (8 << 20), f"{extra / 2**20:.1f} MiB extra"
