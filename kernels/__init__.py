"""Triton kernels for the MIX'EM losses; each matches its pure-PyTorch reference in mixem.losses."""

from mixem.kernels.mixture_entropy import mixture_terms_triton
from mixem.kernels.nt_xent import nt_xent_triton, ntxent_lse_rows_triton, ntxent_lse_triton

__all__ = ["nt_xent_triton", "ntxent_lse_triton", "ntxent_lse_rows_triton", "mixture_terms_triton"]
