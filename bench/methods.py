"""Quality comparison of the methods on one dataset: MIX'EM, ccp, plain SimCLR + k-means and raw-pixel
k-means, side by side (ACC / NMI / ARI), under one preset, in one run.

    python -m mixem.bench.methods [--preset cpu] [--epochs N] [--max-images N] [--methods mixem,ccp,simclr]
                                  [--seeds 0,1,2] [--jobs 3]

Not a speed benchmark, so not on the timing harness: each method is trained once per seed, from the same seed on
the same images with the preset's settings (`--method` is the only difference; ccp gets its centers
head from mixem.session.build_configs), then scored by mixem.evaluate: k-means on the L2-normalised
embedding started from the method's own components / predicted centres ("mixture") and from k-means++
(best of 10), plus the argmax assignment itself. Training times are recorded as conditions only: the
CPU may be shared. Writes bench/results/methods__<preset>__<date>.json atomically.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as _dt
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mixem.bench.harness import RESULTS_DIR, device_info, git_info, version_info, write_result
from mixem import methods
from mixem.config import to_dict
from mixem.errors import MixEMError
from mixem.evaluate import evaluate, extract_features, raw_pixel_baseline
from mixem.runlog import RunLog
from mixem.session import build_configs, load_data
from mixem.runtime import resolve_device
from mixem.train import train



def run_method(method: str, preset: str, over: dict, images, labels, k: int, seed: int, out: Path,
               threads: int = 0) -> dict:
    if threads:
        torch.set_num_threads(threads)
    images = torch.as_tensor(images)
    model_cfg, train_cfg, _ = build_configs(preset, None, {}, {**over, "method": method, "out": str(out / method)})
    t0 = time.perf_counter()
    model, result = train(model_cfg, train_cfg, images, log=RunLog(quiet=True))
    train_s = time.perf_counter() - t0
    feats = extract_features(model, images, device=resolve_device(train_cfg.device))
    rows = evaluate(feats, labels, k, seed=seed, inits=("mixture", "kmeans++"), feature_types=("embedding",))
    init = methods.get(method).headline_init  # the clustering each method prescribes
    head = next(r for r in rows if r["features"] == "embedding" and r["init"] == init)
    last = result.history[-1]
    return {"headline": head, "rows": rows, "train_seconds": round(train_s, 1),
            "first_epoch_terms": {k: v for k, v in result.history[0].items() if k not in ("epoch", "seconds", "lr")},
            "last_epoch_terms": {k: v for k, v in last.items() if k not in ("epoch", "seconds", "lr")},
            "model": to_dict(model_cfg), "train": to_dict(train_cfg)}


def _summary(rows: list[dict]) -> dict:
    """Mean and sample std (0 for one seed) of ACC/NMI/ARI over the seeds' headline rows."""
    out = {"features": rows[0]["features"], "init": rows[0]["init"], "n_seeds": len(rows)}
    for x in ("acc", "nmi", "ari"):
        out[x], out[f"{x}_std"] = statistics.fmean(r[x] for r in rows), (statistics.stdev(r[x] for r in rows) if len(rows) > 1 else 0.0)
        out[f"{x}_per_seed"] = [r[x] for r in rows]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixem.bench.methods", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu", help="preset every method trains with (default cpu)")
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    p.add_argument("--max-images", type=int, default=None, help="first N images only; default: the preset's (all)")
    p.add_argument("--data", default=None, help="dataset path; default: the embedded Fashion-MNIST split")
    p.add_argument("--methods", default=",".join(methods.REGISTRY), help=f"comma-separated subset of {', '.join(methods.REGISTRY)}")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; every method trains once per seed (default 0)")
    p.add_argument("--jobs", type=int, default=1,
                   help="trainings at once, in separate one-thread processes (results do not depend on it)")
    p.add_argument("--device", default=None, help="default: the preset's (auto)")
    p.add_argument("--out", default=None, help="results folder (default: bench/results)")
    args = p.parse_args(argv)
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in chosen if m not in methods.REGISTRY]
    if bad or not chosen:
        print(f"error: --methods takes a comma-separated subset of {', '.join(methods.REGISTRY)}, got {args.methods!r}", file=sys.stderr)
        return 1
    try:
        seeds = sorted({int(x) for x in args.seeds.split(",") if x.strip()})
    except ValueError:
        seeds = []
    if not seeds:
        print(f"error: --seeds takes comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 1
    over = dict(epochs=args.epochs, max_images=args.max_images, data=args.data, device=args.device)
    started = _dt.datetime.now(_dt.timezone.utc)
    git = git_info()  # the code that runs, not whatever is checked out when the run ends
    try:
        model_cfg, train_cfg, preset = build_configs(args.preset, None, {}, over)
        log = RunLog(quiet=False)
        ds = load_data(train_cfg, model_cfg, log)
        if ds.labels is None:
            raise MixEMError(f"{ds.source}: no labels, so there is nothing to score the methods against")
        k = len(ds.class_names) if ds.class_names else len(set(ds.labels.tolist()))
        pairs = [(m, s) for s in seeds for m in chosen]
        print(f"training {', '.join(chosen)} x seeds {', '.join(map(str, seeds))} ({preset} preset, {train_cfg.epochs} "
              f"epochs, {len(ds.images):,} images, {args.jobs} at a time) ...", flush=True)
        bases = {s: raw_pixel_baseline(ds.images, ds.labels, k, seed=s) for s in seeds}
        with tempfile.TemporaryDirectory(prefix="mixem-methods-") as tmp:
            if args.jobs > 1:
                # Spawned processes (a fork would inherit torch's thread pools), one thread each, so
                # `jobs` processes use `jobs` cores. The images go as a numpy array: pickling a tensor
                # moves its storage to shared memory in the pool's feeder thread, under any numpy
                # view of it that this process holds (it crashed raw_pixel_baseline running alongside).
                images = ds.images.numpy().copy()
                with concurrent.futures.ProcessPoolExecutor(min(args.jobs, len(pairs)),
                                                            mp_context=multiprocessing.get_context("spawn")) as pool:
                    futures = {(m, s): pool.submit(run_method, m, preset, {**over, "seed": s}, images, ds.labels, k, s,
                                                   Path(tmp) / str(s), threads=1) for m, s in pairs}
                    runs = {key: f.result() for key, f in futures.items()}
            else:
                runs = {(m, s): run_method(m, preset, {**over, "seed": s}, ds.images, ds.labels, k, s, Path(tmp) / str(s))
                        for m, s in pairs}
        for (m, s), r in runs.items():
            h = r["headline"]
            print(f"  {m} seed {s}: ACC {h['acc']:.4f}  NMI {h['nmi']:.4f}  ARI {h['ari']:.4f}  ({r['train_seconds']:.0f} s training)")
    except MixEMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    table = [{"method": m, **_summary([runs[(m, s)]["headline"] for s in seeds])} for m in chosen]
    table.append({"method": "raw-pixel k-means", **_summary([bases[s] for s in seeds])})
    dev = resolve_device(train_cfg.device)
    info, versions = device_info(dev), version_info()
    data = {
        "bench": "methods", "preset": preset, "seeds": seeds, "device": info, "versions": versions, "git": git,
        "started_utc": started.isoformat(timespec="seconds"),
        "seconds": round((_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(), 1),
        "jobs": args.jobs,
        "conditions": (f"{preset} preset, {train_cfg.epochs} epochs x batch {train_cfg.batch_size}, seeds "
                       f"{', '.join(map(str, seeds))} (mean and sample std over seeds), {len(ds.images):,} images of "
                       f"{ds.source}, k={k}, scored on the training images; on {info['name']} "
                       f"({info.get('cores')} cores, shared) with torch=={versions['torch']}"),
        "data": {"source": ds.source, "images": len(ds.images), "k": k, "max_images": train_cfg.max_images},
        "table": table,
        "methods": {m: {str(s): runs[(m, s)] for s in seeds} for m in chosen},
        "raw_pixel_kmeans": {str(s): bases[s] for s in seeds},
        "not_measured": [] if len(seeds) > 1 else ["variance over seeds: one seed (pass --seeds 0,1,2 for a spread)"],
    }
    path = Path(args.out) if args.out else RESULTS_DIR
    fname = path / f"methods__{preset}__{started.date().isoformat()}.json"
    write_result(fname, data)
    print(f"{'method':<18} {'clustering':<20} {'ACC':>15} {'NMI':>15} {'ARI':>15}")
    for r in table:
        print(f"{r['method']:<18} {r['features'] + ' / ' + r['init']:<20} "
              + " ".join(f"{r[x]:.4f} ± {r[x + '_std']:.4f}" for x in ("acc", "nmi", "ari")))
    print(f"wrote {fname}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
