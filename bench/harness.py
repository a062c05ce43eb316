"""The harness every benchmark runs under: check, warm up, time, peak memory, ceilings, atomic JSON.

A benchmark is a module `bench/<file>.py` that defines
    NAME: str                                   the name `mixem-fast bench NAME` takes
    cases(quick: bool) -> list[dict]            JSON-able case parameters; quick = tiny CPU smoke cases
    setup(case, device) -> dict[str, callable]  candidates, baseline first ({"torch": fn, "triton": fn});
                                                each fn runs one iteration and returns its result
optionally
    check(case, candidates) -> dict | None      correctness first: raise (AssertionError) on a mismatch;
                                                a returned dict (e.g. max errors) is recorded
    work(case) -> {"flop": n, "bytes": n, "exp": n, "images": n}   work of one iteration, for rates and the floor
    not_measured(device) -> list[str]           what this benchmark could not measure here, and why
    summarize(case, records) -> dict            figures derived from the timed records (e.g. a bound
                                                that several candidates' rates define), stored as "summary"
A study (a measurement that is not one timed call, e.g. training each method over seeds) instead defines
    NAME, PARAMS: dict (defaults; `--set KEY=VALUE` overrides, typed by the default), QUICK: dict (the
    smoke-test values), study(params, quick, device) -> dict (its results; "lines" are printed), and
    optionally result_stem(params) -> str (the JSON file's first part, default NAME) and
    plot(data, path) -> path (a figure written beside the JSON).
Every candidate runs in the same process on the same inputs as the baseline. A candidate that runs
out of memory is recorded as "oom", any other exception as "error", and the next one runs.
Timing: CUDA `triton.testing.do_bench` (L2 flushed, 20/50/80 % quantiles); CPU the median of repeated
`time.perf_counter` calls (median, 20/80 % quantiles, min, max; before stop 22 the CPU's q20/q80 fields held
the min and max), each candidate's in turn, or round-robin where the module sets INTERLEAVE = True (all its
candidates alive at once: for comparisons on a shared CPU, bench/timing.py). Peak memory: CUDA
max_memory_allocated over one call; CPU the process RSS.
On CUDA the ceilings (bf16 and fp32 8192² matmul, device copy) are measured in the same run, and each
candidate's time is compared with the floor max(flop / matmul rate, bytes / copy rate).
Results: bench/results/<bench>__<device>__pt<torch>__<date>.json, written atomically.
"""

from __future__ import annotations

import ast
import datetime as _dt
import importlib
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

from mixem.bench import timing
from mixem.errors import ConfigError

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
_NOT_BENCHMARKS = {"harness", "__init__", "__main__"}


def available() -> list[str]:
    """Names of the benchmark modules in bench/ (files that assign NAME), found without importing them."""
    return sorted(_modules())


def _modules() -> dict[str, str]:
    found = {}
    for path in sorted(BENCH_DIR.glob("*.py")):
        if path.stem in _NOT_BENCHMARKS or path.stem.startswith("_"):
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NAME" for t in node.targets):
                if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                    found[node.value.value] = path.stem
    return found


def compile_for_shapes(fn, shapes: int = 64):
    """torch.compile(fn) for a benchmark that feeds it many shapes: each shape recompiles, so Dynamo's
    recompile limit (default 8) is raised above the shape count, or later shapes would silently run eager."""
    import torch._dynamo.config as dcfg

    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(dcfg, knob):
            setattr(dcfg, knob, max(getattr(dcfg, knob), shapes))
    return torch.compile(fn, dynamic=False)


def device_info(dev: torch.device) -> dict:
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        props = torch.cuda.get_device_properties(dev)
        return {
            "type": "cuda",
            "name": name,
            "slug": _slug(name),
            "memory_bytes": props.total_memory,
            "sm_count": props.multi_processor_count,
            "capability": list(torch.cuda.get_device_capability(dev)),
        }
    return {"type": "cpu", "name": _cpu_model(), "slug": "cpu", "cores": os.cpu_count()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def version_info() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("triton", "numpy"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def git_info() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=BENCH_DIR, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        return {
            "sha": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()


def measure_ceilings(dev: torch.device) -> dict:
    """Matmul TFLOP/s (bf16, and fp32 without tf32) and device copy GB/s, measured now on this GPU."""
    from triton.testing import do_bench

    n = 8192
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
        ms = do_bench(lambda a=a, b=b: a @ b, warmup=25, rep=100, return_mode="median")
        out[f"matmul_{str(dtype).split('.')[1]}_tflops"] = 2 * n**3 / (ms * 1e-3) / 1e12
    a = b = None  # free before the copy's 2 GiB
    x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=100, return_mode="median")  # one quantile: a float in Triton 3.6
    out["copy_gbps"] = 2 * x.numel() / (ms * 1e-3) / 1e9  # read + write
    x = y = None
    torch.cuda.empty_cache()
    out["how"] = (
        f"median of triton.testing.do_bench: {n}x{n} @ {n}x{n} matmul (fp32 with tf32 off); 1 GiB copy_ (read + write)"
    )
    return out


def _rates(rec: dict, work: dict, ceilings: dict, case: dict) -> None:
    s = rec["median_ms"] * 1e-3
    if work.get("flop"):
        rec["tflops"] = work["flop"] / s / 1e12
    if work.get("bytes"):
        rec["gbps"] = work["bytes"] / s / 1e9
    if work.get("exp"):
        rec["gexp_per_s"] = work["exp"] / s / 1e9
    if work.get("images"):
        rec["images_per_s"] = work["images"] / s
    if ceilings:
        fp32 = case.get("dtype") in ("float32", "torch.float32")
        peak = ceilings["matmul_float32_tflops" if fp32 else "matmul_bfloat16_tflops"] * 1e12
        floor = max(work.get("flop", 0) / peak, work.get("bytes", 0) / (ceilings["copy_gbps"] * 1e9))
        if floor > 0:
            rec["floor_ms"] = floor * 1e3
            rec["fraction_of_floor"] = floor / s


def _run_case(mod, case: dict, dev: torch.device, quick: bool, ceilings: dict) -> dict:
    out = {"case": case, "candidates": {}}
    work = mod.work(case) if hasattr(mod, "work") else {}
    if work:
        out["work"] = work
    try:
        cands = mod.setup(case, dev)
    except Exception as e:  # noqa: BLE001 (an OOM or a failure in one case must not end the run)
        out["setup"] = "oom" if _is_oom(e) else f"error: {type(e).__name__}: {e}"
        _free(dev)
        return out
    if hasattr(mod, "check"):
        try:
            out["check"] = {"status": "ok", **(mod.check(case, cands) or {})}
        except AssertionError as e:
            out["check"] = {"status": "failed", "message": str(e).splitlines()[0] if str(e) else "assertion failed"}
            return out  # correctness first: a wrong candidate is not timed
        except Exception as e:  # noqa: BLE001
            out["check"] = {"status": "skipped", "message": "oom" if _is_oom(e) else f"{type(e).__name__}: {e}"}
            _free(dev)
    base_name = next(iter(cands), None)
    rounds = timing.time_interleaved(cands, quick) if getattr(mod, "INTERLEAVE", False) and dev.type == "cpu" else {}
    for name in list(cands):
        # Dropped once timed: a candidate may hold large state (a retained autograd graph) that must
        # not count against the next one's memory.
        fn = cands.pop(name)
        try:
            took = rounds[name] if rounds else timing.time_one(fn, dev, quick)
            if isinstance(took, Exception):
                raise took
            rec = {"status": "ok", **took, **timing.peak(fn, dev)}
            _rates(rec, work, ceilings, case)
        except Exception as e:  # noqa: BLE001
            rec = (
                {"status": "oom"}
                if _is_oom(e)
                else {"status": "error", "error": f"{type(e).__name__}: {e}".splitlines()[0]}
            )
        del fn
        _free(dev)
        out["candidates"][name] = rec
    base = out["candidates"].get(base_name, {})
    for rec in out["candidates"].values():
        if rec["status"] == "ok" and base.get("status") == "ok":
            rec["speedup_vs_" + base_name] = base["median_ms"] / rec["median_ms"]
            if rounds and (paired := timing.paired_speedup(base, rec)) is not None:
                rec["paired_speedup_vs_" + base_name] = paired
    if hasattr(mod, "summarize"):
        out["summary"] = mod.summarize(case, out["candidates"])
    return out


def _free(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def write_result(path: Path, data: dict) -> None:
    from mixem.files import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1, default=str) + "\n")


def _metadata(name: str, dev: torch.device, quick: bool, started) -> dict:
    info, versions = device_info(dev), version_info()
    return {
        "bench": name,
        "quick": quick,
        "device": info,
        "versions": versions,
        "git": git_info(),
        "started_utc": started.isoformat(timespec="seconds"),
        "seconds": round((_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(), 1),
    }


def _parse_settings(mod, settings: dict, quick: bool) -> dict:
    """A study's parameters: its PARAMS defaults, QUICK's in quick mode, then the --set values, each coerced to
    the type of its default; an unknown key is a one-line error naming the known ones."""
    params = {**mod.PARAMS, **(getattr(mod, "QUICK", {}) if quick else {})}
    unknown = sorted(set(settings) - set(params))
    if unknown:
        raise ConfigError(f"{mod.NAME} has no parameter {', '.join(unknown)}; it takes {', '.join(sorted(params))}")
    for key, text in settings.items():
        kind = type(mod.PARAMS[key])
        try:
            params[key] = (str(text).lower() in ("1", "true", "yes")) if kind is bool else kind(text)
        except ValueError:
            raise ConfigError(f"{mod.NAME}: {key}={text!r} is not a {kind.__name__}") from None
    return params


def run(
    name: str, quick: bool = False, out_dir: str | None = None, device: str = "auto", settings: dict | None = None
) -> dict:
    """Run one benchmark; returns the result dict, with the JSON file it wrote under "path".

    settings ("--set KEY=VALUE"): for a benchmark of cases, keep only the cases whose fields equal these
    values (compared as strings; "a,b" takes either), e.g. {"M": "4096,65536", "dtype": "bfloat16"}, to fit a long grid into a
    time-limited GPU session; for a study (a module with PARAMS and study()), its parameters.
    """
    modules = _modules()
    if name not in modules:
        raise ConfigError(f"no benchmark named {name!r}; available: {', '.join(sorted(modules)) or 'none'}")
    from mixem.runtime import resolve_device

    dev = resolve_device(device)
    if dev.type == "cpu" and "triton" not in sys.modules:
        # Triton picks compiled or interpreted kernels when a kernel is defined, i.e. at import.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    mod = importlib.import_module(f"mixem.bench.{modules[name]}")
    started = _dt.datetime.now(_dt.timezone.utc)
    if hasattr(mod, "study"):
        params = _parse_settings(mod, settings or {}, quick)
        body = {"params": params, **mod.study(params, quick, dev)}
        stem = mod.result_stem(params) if hasattr(mod, "result_stem") else name
    else:
        body = _run_cases(mod, dev, quick, settings or {})
        stem = name
    data = {**_metadata(name, dev, quick, started), **body}
    data.setdefault(
        "conditions",
        f"on {data['device']['name']} with torch=={data['versions']['torch']}, "
        f"triton=={data['versions']['triton']}; times are medians "
        f"({'do_bench' if dev.type == 'cuda' else 'perf_counter'})",
    )
    torch_v = data["versions"]["torch"].split("+")[0]
    fname = f"{stem}__{data['device']['slug']}__pt{torch_v}__{started.date().isoformat()}.json"
    # A smoke run (--quick) never replaces a full run's file of the same day.
    path = Path(out_dir) if out_dir else RESULTS_DIR / "quick" if quick else RESULTS_DIR
    write_result(path / fname, data)
    data["path"] = str(path / fname)
    if hasattr(mod, "plot"):  # a figure of the result, beside its JSON
        try:
            data["plot"] = str(mod.plot(data, (path / fname).with_suffix(".svg")))
        except ImportError as e:  # matplotlib is optional: the JSON is the result
            data["plot"] = f"not drawn: {e} (pip install matplotlib)"
    return data


def _run_cases(mod, dev: torch.device, quick: bool, select: dict) -> dict:
    not_measured = list(mod.not_measured(dev)) if hasattr(mod, "not_measured") else []
    ceilings = {}
    if dev.type == "cuda":
        ceilings = measure_ceilings(dev)
        not_measured.append("exp (MUFU) rate: not measured; the floor counts matmul FLOPs and bytes only")
    else:
        not_measured.append(
            "no CUDA GPU in this session: triton kernels ran in the interpreter (TRITON_INTERPRET=1); "
            "timings are not meaningful for GPU performance, and GPU numbers need a GPU session"
        )
        not_measured.append("ceilings (matmul TFLOP/s, copy GB/s) and fraction of the floor: need a GPU")
        not_measured.append("per-candidate peak memory: on CPU only the process RSS is recorded")
    wanted = {k: {w.strip() for w in str(v).split(",")} for k, v in select.items()}  # "M=4096,65536": either
    chosen = [c for c in mod.cases(quick) if all(str(c.get(k)) in vs for k, vs in wanted.items())]
    if not chosen:
        raise ConfigError(
            f"{mod.NAME}: no case matches {select}; its cases have the fields "
            f"{', '.join(sorted({k for c in mod.cases(quick) for k in c}))}"
        )
    results = [_run_case(mod, case, dev, quick, ceilings) for case in chosen]
    return {
        "select": select,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "ceilings": ceilings,
        "not_measured": not_measured,
        "cases": results,
    }


def summary_lines(result: dict) -> list[str]:
    """What `mixem-fast bench` prints: one line per case (check, each candidate's median), or a study's own."""
    if "cases" not in result:
        return list(result.get("lines", []))
    lines = []
    for case in result["cases"]:
        cands = ", ".join(
            f"{n} {c['median_ms']:.3g} ms" if c["status"] == "ok" else f"{n} {c['status']}"
            for n, c in case["candidates"].items()
        )
        check = case.get("check", {}).get("status", "-")
        lines.append(f"{case['case']}  check={check}  {cands or case.get('setup', '')}")
    return lines
