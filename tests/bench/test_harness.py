"""The shared harness: discovery, check-first, OOM handling, case selection, study parameters, JSON."""

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from mixem.bench import available, run
from mixem.errors import ConfigError


def test_benchmarks_are_discovered():
    assert {"kernel_nt_xent", "kernel_mixture_entropy", "methods", "embed_rss"} <= set(available())


def test_harness_records_checks_ooms_and_writes_json(tmp_path, monkeypatch, device):
    import mixem.bench.kernel_mixture_entropy as mod
    from mixem.losses import mixture_terms_torch

    real_setup = mod.setup

    def setup(case, dev):
        cands = real_setup(case, dev)
        if case["variant"] == "oom":

            def boom():
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

            return {"torch": cands["torch"], "boom": boom, "triton": cands["triton"]}
        return {"torch": cands["torch"], "triton": lambda: cands["torch"]() + 1.0}  # a wrong "kernel"

    monkeypatch.setattr(mod, "_compiled", lambda: mixture_terms_torch)  # keep the smoke test free of compiles
    monkeypatch.setattr(mod, "setup", setup)
    monkeypatch.setattr(
        mod,
        "cases",
        lambda quick: [
            {"B": B, "K": 3, "dtype": "float32", "phase": "fwd", "variant": v}
            for B, v in ((7, "oom"), (7, "wrong"), (9, "wrong"))
        ],
    )
    res = run("kernel_mixture_entropy", quick=True, out_dir=str(tmp_path), device=device.type, settings={"B": "7"})

    assert re.fullmatch(
        r"kernel_mixture_entropy__[a-z0-9-]+__pt[0-9.a-z]+__\d{4}-\d\d-\d\d\.json", res["path"].split("/")[-1]
    )
    on_disk = json.loads(open(res["path"]).read())
    assert on_disk["bench"] == "kernel_mixture_entropy" and on_disk["versions"]["torch"] == torch.__version__
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert on_disk["git"]["sha"] == head.stdout.strip()  # the code that ran
    assert on_disk["not_measured"], "every run says what it could not measure"
    oom, wrong = on_disk["cases"]  # select dropped the B = 9 case
    assert oom["check"]["status"] == "ok"
    assert oom["candidates"]["boom"] == {"status": "oom"}
    assert oom["candidates"]["torch"]["status"] == oom["candidates"]["triton"]["status"] == "ok"
    t, k = oom["candidates"]["torch"], oom["candidates"]["triton"]
    assert k["speedup_vs_torch"] == pytest.approx(t["median_ms"] / k["median_ms"])
    assert wrong["check"]["status"] == "failed" and wrong["candidates"] == {}
    assert list(tmp_path.glob(".*.tmp*")) == [], "the atomic write leaves no temporary file"


def test_unknown_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="no case matches"):
        run("kernel_mixture_entropy", quick=True, out_dir=str(tmp_path), device="cpu", settings={"B": "3"})
    with pytest.raises(ConfigError, match="methods has no parameter colour; it takes data, epochs"):
        run("methods", quick=True, out_dir=str(tmp_path), device="cpu", settings={"colour": "red"})
    with pytest.raises(ConfigError, match="jobs='many' is not a int"):
        run("methods", quick=True, out_dir=str(tmp_path), device="cpu", settings={"jobs": "many"})
    assert list(tmp_path.iterdir()) == []


def test_a_setting_may_list_several_values(tmp_path, monkeypatch):
    import mixem.bench.kernel_mixture_entropy as mod

    grid = [{"B": B, "K": K, "dtype": "float32", "phase": "fwd"} for B in (5, 7, 9) for K in (2, 3)]
    monkeypatch.setattr(mod, "cases", lambda quick: grid)
    from mixem.losses import mixture_terms_torch

    monkeypatch.setattr(mod, "_compiled", lambda: mixture_terms_torch)  # no compiles in a selection test
    res = run(
        "kernel_mixture_entropy", quick=True, out_dir=str(tmp_path), device="cpu", settings={"B": "5, 9", "K": "3"}
    )
    assert [(c["case"]["B"], c["case"]["K"]) for c in res["cases"]] == [(5, 3), (9, 3)]


def test_interleaved_timing_runs_the_candidates_round_robin_and_keeps_their_errors():
    from mixem.bench import timing

    calls = []

    def cand(name, fail_at=None):
        def fn():
            calls.append(name)
            if fail_at is not None and calls.count(name) == fail_at:
                raise RuntimeError(f"{name} broke")

        return fn

    got = timing.time_interleaved({"a": cand("a"), "b": cand("b"), "c": cand("c", fail_at=3)}, quick=True, settle_s=0)
    # Warm-ups in order, then round i of every live candidate before round i + 1; "c" fails in its second round.
    assert calls == ["a", "b", "c", "a", "b", "c", "a", "b", "c", "a", "b"]
    assert list(got) == ["a", "b", "c"] and isinstance(got["c"], RuntimeError)
    assert got["a"]["n"] == got["b"]["n"] == timing.reps(True) == len(got["a"]["times_ms"])
    # Paired: each round's ratio, then their median; a slow round for both cancels.
    base, other = {"times_ms": [10.0, 30.0, 10.0]}, {"times_ms": [5.0, 15.0, 10.0]}
    assert timing.paired_speedup(base, other) == 2.0 and timing.paired_speedup(base, {"times_ms": [1.0]}) is None


def test_cpu_times_report_true_quantiles_beside_min_and_max():
    from mixem.bench import timing

    s = timing._stats([float(v) for v in range(1, 11)])  # 1..10 ms
    assert s["median_ms"] == 5.5 and (s["min_ms"], s["max_ms"]) == (1.0, 10.0)
    assert timing._stats([10.0, 10.0, 10.0, 50.0])["mean_ms"] == 20.0  # a stall counts in the mean, not the median
    assert s["q20_ms"] == pytest.approx(2.8) and s["q80_ms"] == pytest.approx(8.2)  # inclusive deciles, not the ends
