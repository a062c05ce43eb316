"""How the harness times a candidate and reads its memory: CUDA `triton.testing.do_bench`; on the CPU repeated
`time.perf_counter` calls, one candidate after another or, for a benchmark that asks (INTERLEAVE), round-robin."""

from __future__ import annotations

import os
import resource
import statistics
import time

import torch


def _stats(times: list[float]) -> dict:
    """Median and the 20/80 % quantiles (as do_bench gives them on CUDA), plus min, max and mean, of times in ms.
    The mean is what a loop of such calls costs per call: a pipelined loop (a DataLoader's) has fast calls and
    a stall now and then, which the median hides."""
    q = statistics.quantiles(times, n=10, method="inclusive")  # deciles: q[1] is the 20 %, q[7] the 80 % point
    return {
        "median_ms": statistics.median(times),
        "q20_ms": q[1],
        "q80_ms": q[7],
        "min_ms": min(times),
        "max_ms": max(times),
        "mean_ms": statistics.fmean(times),
        "n": len(times),
        "timer": "time.perf_counter",
        "times_ms": [round(t, 3) for t in times],
    }


def reps(quick: bool) -> int:
    return 3 if quick else 10


def time_one(fn, dev: torch.device, quick: bool) -> dict:
    """fn's time: do_bench's quantiles on CUDA; on the CPU one warm-up call, then reps(quick) timed calls."""
    if dev.type == "cuda":
        from triton.testing import do_bench

        q20, q50, q80 = do_bench(fn, warmup=10 if quick else 25, rep=20 if quick else 100, quantiles=[0.2, 0.5, 0.8])
        return {"median_ms": q50, "q20_ms": q20, "q80_ms": q80, "timer": "triton.testing.do_bench"}
    fn()  # warm-up: compiles, fills caches
    times = []
    for _ in range(reps(quick)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _stats(times)


SETTLE_S = 0.3  # idle before each round-robin call: the previous candidate's spinning threads go to sleep


def time_interleaved(fns: dict, quick: bool, settle_s: float = SETTLE_S) -> dict[str, dict | Exception]:
    """Every candidate's CPU time, timed round-robin: each is warmed up once, then repetition i of every
    candidate runs before repetition i + 1 of any, so a load that comes and goes on a shared machine falls on
    all of them alike instead of on whichever was being timed then. Each timed call starts after settle_s
    idle: a BLAS or OpenMP pool keeps spinning for a while after its last call (numpy's GEMM loop right
    before it slowed scikit-learn's k-means 4 %, measured), which would charge one candidate for another.
    A candidate that raises is dropped from the rounds and its exception returned in its place."""
    times: dict[str, list[float]] = {}
    out: dict[str, dict | Exception] = {}
    for name, fn in fns.items():
        try:
            fn()
            times[name] = []
        except Exception as e:  # noqa: BLE001 (recorded by the harness as that candidate's error)
            out[name] = e
    for _ in range(reps(quick)):
        for name in list(times):
            time.sleep(settle_s)
            t0 = time.perf_counter()
            try:
                fns[name]()
            except Exception as e:  # noqa: BLE001
                out[name] = e
                del times[name]
                continue
            times[name].append((time.perf_counter() - t0) * 1e3)
    out.update({name: _stats(t) for name, t in times.items()})
    return {name: out[name] for name in fns}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak(fn, dev: torch.device) -> dict:
    """CUDA: peak allocated over one call of fn (and above what was allocated before); CPU: the process RSS now
    and its lifetime maximum (fn is not called: on the CPU both figures are process-wide)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        top = torch.cuda.max_memory_allocated(dev)
        return {"peak_bytes": top, "peak_extra_bytes": top - base}
    return {"rss_bytes": rss_bytes(), "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def paired_speedup(base: dict, rec: dict) -> float | None:
    """Median over round-robin rounds of base's time / rec's time in the same round: a load that comes and goes
    cancels in each pair, where a ratio of two medians still carries it. None without two rounds of each."""
    a, b = base.get("times_ms") or [], rec.get("times_ms") or []
    if min(len(a), len(b)) < 2 or len(a) != len(b):
        return None
    return statistics.median(x / y for x, y in zip(a, b))
