"""The streaming embedding run: manifest, parallel bounded decode, engine, shard writer; resumable, one rank of W."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mixem import fingerprints, folders, manifest, owner, rundir, shards
from mixem.config import DECODERS, EMBED_FEATURES
from mixem.embed_decode import Decoder, resolve_decoder
from mixem.errors import ConfigError, DataError
from mixem.files import atomic_write_text
from mixem.runlog import RunLog
from mixem.runtime import available_memory, job_id, torchrun_env


@dataclass
class EmbedOptions:
    """One embedding run; the fields a resumed or parallel run must repeat are saved in manifest.json."""

    engine: str = "torch"  # torch | onnx | trt (mixem.engines.load_engine)
    device: str = "auto"  # auto = cuda:LOCAL_RANK when there is a GPU, else cpu
    features: str = "embedding"  # embedding (mixture z) | backbone (h; needs an engine exported with --features)
    batch_size: int = 256  # images per engine call
    shard_size: int = 10_000  # images per output shard (~ shard_size * D * 2 bytes of float16 per npy)
    workers: int = 0  # decode threads; 0 = one per available CPU
    prefetch: int = 2  # batches decoded ahead of the engine: memory is (prefetch + 1) batches of pixels
    decoder: str = "auto"  # auto (nvjpeg on a CUDA engine, else pil) | pil | nvjpeg
    manifest_wait_s: float = 3600.0  # how long ranks > 0 wait for rank 0 to list the folder
    update: bool = False  # the folder changed since the run listed it: embed the changes, keep the rest
    follow_links: bool = False  # follow links that lead outside the image folder (off: they are left out)

    def __post_init__(self):
        if self.features not in EMBED_FEATURES:
            raise ConfigError(f"--features must be one of {', '.join(EMBED_FEATURES)}, got {self.features!r}")
        if self.decoder not in DECODERS:
            raise ConfigError(f"--decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        if self.batch_size < 1 or self.prefetch < 0 or self.workers < 0 or self.shard_size < 1:
            raise ConfigError("--batch-size and --shard-size must be >= 1, --prefetch and --workers >= 0")


class _Shard:
    """One shard's rows as they arrive from the engine, until the shard is complete."""

    def __init__(self, shard: int, start: int, paths: list[str], root: str, gone: list[bool], digest: str):
        n = len(paths)
        self.shard, self.start, self.n, self.filled, self.digest = shard, start, n, 0, digest
        self.paths = [f"{root}/{p}" for p in paths]
        self.gone = gone
        self.status, self.errors = [shards.OK] * n, [None] * n
        self.vectors, self.probs = None, None
        self.fingerprints = np.zeros((n, fingerprints.DIM), np.float16)
        self.t0 = time.perf_counter()

    def add(self, at: int, vectors: np.ndarray, probs: np.ndarray, fps: np.ndarray, status):
        if self.vectors is None:
            self.vectors = np.zeros((self.n, vectors.shape[1]), np.float16)
            self.probs = np.zeros((self.n, probs.shape[1]), np.float32)
        self.vectors[at : at + len(vectors)] = vectors
        self.probs[at : at + len(probs)] = probs
        self.fingerprints[at : at + len(fps)] = fps
        for j, (st, err) in enumerate(status):
            if self.gone[at + j]:  # listed once, gone since (embed --update): a row kept so ids never move
                st, err = "removed", "removed from the image folder (embed --update)"
            self.status[at + j], self.errors[at + j] = st, err
        self.filled += len(vectors)


def _outputs(engine, x, features: str, bad: np.ndarray):
    outs = engine(x)
    if features == "backbone":
        # Unit rows like the mixture embedding: cosine search and spherical k-means need them, and fp16 is safe.
        vec = torch.nn.functional.normalize(outs[2].float(), dim=1)
    else:
        vec = outs[0].float()
    vec, probs = vec.cpu().numpy(), outs[1].float().cpu().numpy()
    vec[bad], probs[bad] = 0, 0  # zero rows for unreadable files: row-aligned, never mistaken for data
    finite = np.isfinite(vec).all(1) & np.isfinite(probs).all(1)
    return vec.astype(np.float16), probs, finite


def load_embed_engine(model: str, engine: str, features: str, device: str | torch.device, batch_size: int = 1):
    """The engine an embedding run (or a search in it) uses: backbone features and batch size checked."""
    from mixem.engines import load_engine

    extra = {"features": True} if engine == "torch" and features == "backbone" else {}
    eng = load_engine(model, engine, device, **extra)
    if features == "backbone" and "features" not in eng.outputs:
        raise ConfigError(
            f"{model}: this {engine} model has no backbone features output; re-export it with "
            "`mixem-fast export CKPT --features`, or use --features embedding"
        )
    if eng.max_batch is not None and batch_size > eng.max_batch:
        raise ConfigError(f"--batch-size {batch_size} exceeds this engine's max batch {eng.max_batch}")
    return eng


def _clean_tmp(out: Path, todo: list[int]):
    """Before redoing this rank's unfinished shards: remove their half-written files (a killed run's
    `.NAME.tmpPID`, and no other file) and stats that do not check out (another run's, or damaged)."""
    for d in (shards.EMB_DIR, shards.FP_DIR, shards.META_DIR, shards.STATS_DIR):
        owner.clean_temps(out / d, {shards.temp_names(s)[d] for s in todo})
    for s in todo:
        shards.stats_path(out, s).unlink(missing_ok=True)


def check_memory(engine, opts: EmbedOptions) -> None:
    """Refuse, before anything is written, pixel buffers (prefetch + 2 batches) that cannot fit in memory."""
    S, C = engine.image_size, engine.in_channels
    need = (opts.prefetch + 2) * opts.batch_size * C * S * S
    have = available_memory()
    if have is not None and need > have // 2:
        raise ConfigError(
            f"--batch-size {opts.batch_size} of {C}x{S}x{S} images needs {need / 2**30:.1f} GiB of pixel buffers "
            f"({opts.prefetch + 2} batches), more than half of the {have / 2**30:.1f} GiB available; "
            "lower --batch-size (or the model's image_size)"
        )


@contextlib.contextmanager
def _own(out: Path, rank: int, opts: EmbedOptions, log: RunLog):
    """Rank 0 owns the folder (rundir.claim) for the run; the other ranks of its torchrun job join it."""
    if rank > 0:
        owner.join(out, rundir.KIND, job_id(), opts.manifest_wait_s)
        yield None
        return
    with rundir.claim(out, "embed", job=job_id()) as claim:
        if claim.stale:
            log.print(f"{out}: taking over from {owner.who(claim.stale)}, which stopped without finishing")
        owner.clean_temps(out, rundir.TOP_FILES)
        yield claim


def embed_folder(
    model: str, images: str | Path, out: str | Path, opts: EmbedOptions | None = None, log: RunLog | None = None
) -> dict:
    """Embed every image under `images` into shards in `out`; returns this rank's summary (see summarize)."""
    from mixem.engines import model_identity

    opts = opts or EmbedOptions()
    log = log or RunLog(quiet=True)
    out = Path(out)
    rank, world, _ = torchrun_env()
    # Before touching --out or listing the folder, so a wrong model fails in a second; "auto" is resolved once.
    engine = load_embed_engine(model, opts.engine, opts.features, opts.device, opts.batch_size)
    how = resolve_decoder(opts.decoder, engine.device, log)
    check_memory(engine, opts)
    path, sha = model_identity(engine)
    settings = dict(
        model=path,
        model_sha256=sha,
        engine=opts.engine,
        features=opts.features,
        image_size=engine.image_size,
        in_channels=engine.in_channels,
        follow_links=opts.follow_links,
    )
    with _own(out, rank, opts, log):
        m = _open(images, out, settings, opts, rank, world, log)
        return _run(engine, m, out, opts, how, rank, world, log)


def _open(images, out: Path, settings: dict, opts: EmbedOptions, rank: int, world: int, log: RunLog):
    """Rank 0 lists the folder (new run, resume, or --update); the other ranks wait for its manifest."""
    t_list = time.perf_counter()
    if rank == 0:
        m, changes = manifest.open_run(Path(images), out, settings, opts.shard_size, update=opts.update)
        left = changes.get("links_left_out")
        if left:
            log.print(
                f"{len(left)} files were left out: links that lead outside {m.root} (--follow-links follows them) "
                f"or names that are not UTF-8; e.g. {left[0]}"
            )
        if any(changes.get(k) for k in ("removed", "modified")) or (changes.get("added") and "new_run" not in changes):
            log.print(f"--update: {manifest.describe(changes)}; the shards holding them are embedded again")
    else:
        m = manifest.wait_for(Path(images), out, settings, opts.shard_size, opts.manifest_wait_s)
    log.print(
        f"{m.n_files:,} files in {m.n_shards} shards of {m.shard_size:,} "
        f"(manifest {time.perf_counter() - t_list:.1f} s); rank {rank} of {world}"
    )
    return m


def _run(engine, m: manifest.Manifest, out: Path, opts: EmbedOptions, how: str, rank: int, world: int, log) -> dict:
    """This rank's shards that do not check out yet, embedded; returns the summary."""
    mine = manifest.rank_shards(m.n_shards, rank, world)
    done = shards.done_shards(out, m)
    todo = [s for s in mine if s not in done]
    _clean_tmp(out, todo)
    workers = opts.workers or folders.default_threads()
    total = sum(m.shard_range(s)[1] - m.shard_range(s)[0] for s in todo)
    log.print(
        f"engine {engine.name} ({engine.provider}) on {engine.device}, decoder {how} x{workers}; "
        f"{len(mine) - len(todo)} of this rank's {len(mine)} shards already done"
    )
    log.event("embed_start", rank=rank, world=world, shards=len(mine), todo=len(todo), images=total, decoder=how)

    t0 = time.perf_counter()
    with log.progress(total, f"embed r{rank}") as bar:
        counts = _stream(engine, m, out, todo, opts, how, workers, bar, log)
    seconds = time.perf_counter() - t0
    summary = dict(
        rank=rank,
        world=world,
        shards=len(mine),
        shards_done_now=len(todo),
        shards_already_done=len(mine) - len(todo),
        images_this_run=counts["images"],
        embedded_this_run=counts["ok"],
        bad_this_run=counts["bad"],
        seconds=round(seconds, 3),
        images_per_s=round(counts["images"] / seconds, 1) if seconds > 0 else None,
        engine=engine.name,
        provider=engine.provider,
        device=str(engine.device),
        decoder=how,
    )
    summary.update(summarize(out, m))
    log.event("embed_end", **summary)
    return summary


def _stream(
    engine,
    m: manifest.Manifest,
    out: Path,
    todo: list[int],
    opts: EmbedOptions,
    how: str,
    workers: int,
    bar,
    log: RunLog,
) -> dict[str, int]:
    """Decode (threads, prefetch + 1 batches ahead), run the engine, and hand each full shard to one writer thread."""
    counts = {"images": 0, "ok": 0, "bad": 0}
    with (
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="write") as writer,
    ):
        root = None if m.follow_links else os.path.realpath(m.root)
        dec = Decoder(pool, workers, engine.image_size, engine.in_channels, how, engine.device, root)
        specs = _batch_specs(m, out, todo, opts.batch_size)
        pending: deque = deque()
        write: Future | None = None
        for _ in range(opts.prefetch + 1):
            _push(pending, specs, dec)
        while pending:
            shard, at, job = pending.popleft()
            x, status = dec.result(job)
            _push(pending, specs, dec)  # the next decode runs while the engine works on this batch
            bad = np.array([s != shards.OK for s, _ in status])
            vec, probs, finite = _outputs(engine, x, opts.features, bad)
            _refuse_nonfinite(finite, bad, shard.paths[at : at + len(status)], m.model)
            fps = fingerprints.describe(x)  # near-duplicate descriptors of the same pixels (mixem.fingerprints)
            fps[bad] = 0
            shard.add(at, vec, probs, fps, status)
            counts["images"] += len(status)
            counts["bad"] += int(bad.sum())
            counts["ok"] += int((~bad).sum())
            bar.advance(len(status), bad=counts["bad"])
            if shard.filled == shard.n:
                if write is not None:
                    write.result()  # one shard in the writer at a time: bounded memory, errors surface here
                write = writer.submit(_finish_shard, out, shard, log)
        if write is not None:
            write.result()
    return counts


def _batch_specs(m: manifest.Manifest, out: Path, todo: list[int], batch_size: int):
    """(shard accumulator, offset in shard, paths) per batch; batches never span shards, so a shard's
    batches (and their float results) are the same whichever rank or restart computes it."""
    for s in todo:
        start, _ = m.shard_range(s)
        rows = m.shard_rows(out, s)
        rel, gone = rows.column("path").to_pylist(), rows.column("gone").to_pylist()
        acc = _Shard(s, start, rel, m.root, gone, m.shard_digest(out, s, rows))
        acc.stamp = {"run_id": m.run_id, "digest": acc.digest, "model_sha256": m.model_sha256}
        for j in range(0, len(rel), batch_size):
            yield acc, j, acc.paths[j : j + batch_size]


def _refuse_nonfinite(finite: np.ndarray, bad: np.ndarray, paths: list[str], model: str):
    """NaN or Inf from the engine is a broken model (or weights), not a file's problem: stop, store nothing."""
    wrong = ~finite & ~bad
    if wrong.any():
        raise DataError(
            f"{model}: the model returned NaN or infinite outputs for {int(wrong.sum())} of {len(paths)} images "
            f"(first: {paths[int(np.argmax(wrong))]}); nothing of this batch was stored: check the weights and "
            "config.json (mean, std) of the model"
        )


def _push(pending: deque, specs, dec: Decoder):
    spec = next(specs, None)
    if spec is not None:
        shard, at, paths = spec
        pending.append((shard, at, dec.submit(paths)))


def _finish_shard(out: Path, sh: _Shard, log: RunLog):
    ids = np.arange(sh.start, sh.start + sh.n, dtype=np.int64)
    stats = {
        "start": sh.start,
        "end": sh.start + sh.n,
        "dim": int(sh.vectors.shape[1]),
        "components": int(sh.probs.shape[1]),
        "seconds": round(time.perf_counter() - sh.t0, 3),
        **sh.stamp,
    }
    shards.write_shard(
        out, sh.shard, ids, sh.paths, sh.vectors, sh.probs, sh.status, sh.errors, stats, fingerprints=sh.fingerprints
    )
    log.event("shard", shard=sh.shard, rows=sh.n, bad=sum(s != shards.OK for s in sh.status))


def summarize(out: Path, m: manifest.Manifest) -> dict:
    """Whole-run counts from the stats files; once every shard is done, writes bad_files.* and summary.json."""
    done = shards.done_shards(out, m)
    complete = len(done) == m.n_shards
    res = {
        "out": str(out),
        "files": m.n_files,
        "shards_total": m.n_shards,
        "shards_done": len(done),
        "complete": complete,
    }
    if not complete:
        res["next"] = "rerun the same command (or wait for the other ranks) to finish the remaining shards"
        return res
    # The last rank to finish sees every shard done and writes these; identical content if two race.
    embedded, bad, by_status, dim = 0, [], {}, None
    for s in range(m.n_shards):
        st = shards.read_stats(out, s)
        embedded += st["ok"]
        dim = st["dim"]
        if st["bad"]:
            _, meta = shards.read_shard(out, s, ["image_path", "status", "error"])
            for row in meta.to_pylist():
                if row["status"] != shards.OK:
                    bad.append({"path": row["image_path"], "status": row["status"], "error": row["error"]})
                    by_status[row["status"]] = by_status.get(row["status"], 0) + 1
    # One line per file however it is named: newlines, tabs and backslashes in paths are escaped (\\n, \\t, \\\\).
    text = "".join(f"{shards.escape_path(b['path'])}\t{b['status']}\t{b['error']}\n" for b in bad)
    atomic_write_text(out / rundir.BAD_TXT, text)
    atomic_write_text(out / rundir.BAD_JSONL, "".join(json.dumps(b) + "\n" for b in bad))
    res.update(
        {
            "embedded": embedded,
            "skipped": len(bad),
            "skipped_by_status": by_status,
            "dim": dim,
            "features": m.features,
            "bad_files": str(out / rundir.BAD_TXT),
        }
    )
    atomic_write_text(out / rundir.SUMMARY, json.dumps(res, indent=2) + "\n")
    return res
