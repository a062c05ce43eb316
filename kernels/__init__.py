"""Triton kernels for the MIX'EM losses; each matches its pure-PyTorch reference in mixem.losses."""

from mixem.errors import require

# A CPU-only torch build ships without Triton: say how to get it instead of a bare ImportError.
require("triton", "the fused kernels (impl='triton')", "pip install 'mixem-fast[gpu]'")

from mixem.kernels.mixture_entropy import mixture_terms_triton  # noqa: E402
from mixem.kernels.nt_xent import nt_xent_triton, ntxent_lse_rows_triton, ntxent_lse_triton  # noqa: E402

__all__ = ["nt_xent_triton", "ntxent_lse_triton", "ntxent_lse_rows_triton", "mixture_terms_triton"]
