"""Compile the kernels for an H100 (sm_90) without a GPU; print one JSON line of resource use per build.

Run by test_sm90_build.py in a subprocess without TRITON_INTERPRET (the interpreter never compiles).
Uses the tile configs the launchers pick (`_config`), Triton's bundled ptxas and cuobjdump.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mixem.kernels import mixture_entropy as me
from mixem.kernels import nt_xent as nx

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def build(fn, sig: dict, consts: dict, opts: dict, label: dict) -> None:
    sig = {**sig, **{k: "constexpr" for k in consts}}
    k = triton.compile(ASTSource(fn, sig, consts), target=TARGET, options=opts)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    regs, stack = re.search(r"REG:(\d+).*?STACK:(\d+)", usage).groups()
    print(
        json.dumps(
            {
                **label,
                "kernel": fn.__name__,
                "regs": int(regs),
                "stack": int(stack),
                "shared": k.metadata.shared,
                "wgmma": k.asm["ptx"].count("wgmma.mma_async"),
                **{c: v for c, v in consts.items() if c.isupper() and c != "ACC"},
            }
        )
    )


def nt_xent(dtype, M, D, kind):
    t, acc = TY[dtype], tl.float64 if dtype == torch.float64 else tl.float32
    lt = "fp64" if dtype == torch.float64 else "fp32"
    cfg = nx._config(M, M, D, dtype, kind != "fwd", False)
    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    label = {"dtype": t, "M": M, "D": D, "kind": kind}
    i32 = dict.fromkeys(("RA", "RB", "D", "a_off", "b_off", "stride_a", "stride_b"), "i32")
    if kind == "fwd":
        sig = {"A": "*" + t, "Bm": "*" + t, "LSE": "*" + lt, **i32, "scale2": "fp32"}
        return build(nx._ntxent_lse_fwd_kernel, sig, {**cfg, "ACC": acc}, opts, label)
    sig = {
        "A": "*" + t,
        "Bm": "*" + t,
        "DA": "*" + t,
        **dict.fromkeys(("LSE_A", "DLSE_A", "LSE_B", "DLSE_B"), "*" + lt),
        **i32,
        "stride_da": "i32",
        "DSCALE": "*" + lt,
        "scale2": "fp32",
        "inv_tau": "fp32",
    }
    terms = {"bwd": (True, True), "bwd_rows": (True, False), "bwd_cols": (False, True)}[kind]
    build(nx._ntxent_lse_bwd_kernel, sig, {**cfg, "ROW_TERM": terms[0], "COL_TERM": terms[1], "ACC": acc}, opts, label)


def mixture(dtype, B, K, kind):
    t, ot = TY[dtype], "fp64" if dtype == torch.float64 else "fp32"
    cfg = me._config(B, K)
    opts = {"num_warps": cfg.pop("num_warps")}
    consts = {**cfg, "ACC": tl.float64 if dtype == torch.float64 else tl.float32}
    label = {"dtype": t, "B": B, "K": K, "kind": kind}
    if kind == "fwd":
        sig = {
            "A": "*" + t,
            "PI": "*" + ot,
            "PART": "*" + ot,
            "B": "i32",
            "K": "i32",
            "stride_a": "i32",
            "stride_pi": "i32",
        }
        return build(me._mixture_fwd_kernel, sig, consts, opts, label)
    sig = {
        "A": "*" + t,
        "GPI": "*" + ot,
        "GPBAR": "*" + ot,
        "GSTAT": "*" + ot,
        "DA": "*" + t,
        "B": "i32",
        "K": "i32",
        "stride_a": "i32",
        "stride_g": "i32",
        "stride_da": "i32",
        "inv_b": "fp32",
    }
    build(me._mixture_bwd_kernel, sig, consts, opts, label)


if __name__ == "__main__":
    assert not nx.INTERPRETING, "run without TRITON_INTERPRET"
    for D in (32, 128, 256):
        for kind in ("fwd", "bwd", "bwd_cols"):
            nt_xent(torch.bfloat16, 65536, D, kind)
    for kind in ("fwd", "bwd", "bwd_rows"):
        nt_xent(torch.float32, 65536, 128, kind)
    nt_xent(torch.float32, 4096, 256, "bwd")
    nt_xent(torch.float16, 4096, 128, "bwd")
    for kind in ("fwd", "bwd"):
        nt_xent(torch.float64, 64, 16, kind)
        for K in (10, 1000):
            mixture(torch.bfloat16, 65536, K, kind)
        mixture(torch.float32, 1, 2, kind)  # one-row blocks
    sys.stdout.flush()
