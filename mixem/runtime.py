"""Where work runs: the one device rule, the one reader of torchrun's environment, the OpenMP wait policy.

Light on purpose (torch is imported inside the functions that need it): the CLI calls
`passive_openmp()` before torch or faiss is loaded.
"""

from __future__ import annotations

import os

from mixem.errors import ConfigError


def torchrun_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when run alone."""
    env = os.environ
    try:
        return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None


def resolve_device(name: str = "auto"):
    """The torch.device for a --device value. "auto": this process's GPU (LOCAL_RANK under torchrun)
    when CUDA is available, else the CPU; an explicit CUDA device without a GPU is a one-line error."""
    import torch

    if str(name) == "auto":
        return torch.device(f"cuda:{torchrun_env()[2]}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {name}: no CUDA GPU is visible to PyTorch on this machine; use --device cpu (or auto)"
        )
    return dev


# The benchmarks that time commands which call passive_openmp() run under the same setting.
PASSIVE_OPENMP_BENCHES = ("embed_pipeline", "cluster_faiss")


def passive_openmp() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the user chose a policy; call it before torch or faiss is imported.

    OpenMP reads it once, when the library loads. For commands whose OpenMP work (torch on the CPU, faiss)
    shares the cores with other threads (embed's decoders) or processes: spinning OpenMP threads took the
    decoders' cores (the torch embed pipeline on 2 cores: 2,119 vs 3,030 img/s with OMP_WAIT_POLICY=ACTIVE,
    bench/results/embed_pipeline_omp-active__*) and made faiss k-means ~9x slower on a busy machine
    (bench/cluster_faiss.py).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def job_id() -> str:
    """The torchrun job this process belongs to ("" alone): its rendezvous address and run id, which no other
    job running at the same time shares (two jobs cannot listen on one MASTER_ADDR:MASTER_PORT)."""
    env = os.environ
    parts = (env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", ""), env.get("TORCHELASTIC_RUN_ID", ""))
    return "" if not any(parts) else f"{parts[0]}:{parts[1]}/{parts[2]}"


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def native_bf16(device) -> bool:
    """Whether bf16 autocast is the fast path on `device`: a CUDA GPU, or a CPU with AVX512_BF16 or AMX, where
    oneDNN runs bf16 convolutions and GEMMs natively (the `cpu` preset's quickstart: 166 s against 252 s in
    fp32 on our 2-core EPYC). Elsewhere bf16 is emulated and slower, so "auto" precision stays fp32 there."""
    import torch

    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # torch.cpu's own capability probes
        try:
            if getattr(torch.cpu, probe)():
                return True
        except (AttributeError, RuntimeError):
            continue
    return False
