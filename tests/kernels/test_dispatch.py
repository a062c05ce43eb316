"""impl="triton" in mixem.objectives reaches these kernels and agrees with impl="torch"."""

import torch

from mixem import objectives


def test_objectives_dispatch_to_the_kernels(device):
    z1, z2 = torch.randn(2, 37, 17, device=device).unbind(0)
    logits = torch.randn(37, 10, device=device)
    torch.testing.assert_close(
        objectives.nt_xent(z1, z2, 0.2, impl="triton"),
        objectives.nt_xent(z1, z2, 0.2, impl="torch"),
        atol=1e-5,
        rtol=1e-5,
    )
    fast, ref = objectives.mixture_terms(logits, impl="triton"), objectives.mixture_terms(logits, impl="torch")
    assert fast.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(fast[k], ref[k], atol=1e-6, rtol=1e-5)
