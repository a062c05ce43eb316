"""`python -m mixem.bench NAME [--quick]`: run one benchmark and print where its JSON went."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from mixem.runtime import PASSIVE_OPENMP_BENCHES, passive_openmp

    words = sys.argv[1:] if argv is None else argv
    if words and words[0] in PASSIVE_OPENMP_BENCHES:
        passive_openmp()  # as the commands they time run; before the harness imports torch
    from mixem.bench.harness import available, run

    p = argparse.ArgumentParser(prog="python -m mixem.bench", description="Run a mixem-fast benchmark.")
    p.add_argument("name", nargs="?", help=f"one of: {', '.join(available())}")
    p.add_argument("--quick", action="store_true", help="tiny cases: a smoke test, not a measurement")
    p.add_argument("--out", default=None, help="results folder (default: bench/results)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:N or cpu")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="run only the cases with this field value (repeatable), e.g. --where M=4096")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = p.parse_args(argv)
    if args.list or not args.name:
        print("\n".join(available()))
        return 0 if args.list else 2
    bad = [w for w in args.where if "=" not in w]
    if bad:
        print(f"error: --where takes KEY=VALUE, got {bad[0]!r}", file=sys.stderr)
        return 1
    select = dict(w.split("=", 1) for w in args.where)
    try:
        result = run(args.name, quick=args.quick, out_dir=args.out, device=args.device, select=select)
    except (KeyError, RuntimeError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    for case in result["cases"]:
        cands = ", ".join(
            f"{n} {c['median_ms']:.3g} ms" if c["status"] == "ok" else f"{n} {c['status']}" for n, c in case["candidates"].items()
        )
        check = case.get("check", {}).get("status", "-")
        print(f"{case['case']}  check={check}  {cands or case.get('setup', '')}")
    print(f"wrote {result['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
