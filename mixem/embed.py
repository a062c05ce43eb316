"""The streaming embedding run: manifest, parallel bounded decode, engine, shard writer; resumable, one rank of W."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mixem import folders, manifest, shards
from mixem.config import DECODERS, EMBED_FEATURES
from mixem.errors import ConfigError
from mixem.files import atomic_write_text
from mixem.runlog import RunLog
from mixem.runtime import torchrun_env

_JPEG = (".jpg", ".jpeg")
_NVJPEG_LOCK = threading.Lock()


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

    def __post_init__(self):
        if self.features not in EMBED_FEATURES:
            raise ConfigError(f"--features must be one of {', '.join(EMBED_FEATURES)}, got {self.features!r}")
        if self.decoder not in DECODERS:
            raise ConfigError(f"--decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        if self.batch_size < 1 or self.prefetch < 0 or self.workers < 0:
            raise ConfigError("--batch-size must be >= 1, --prefetch and --workers >= 0")


def decode_into(paths: list[str], out: np.ndarray, size: int, mode: str) -> list[tuple[str, str | None]]:
    """folders.decode_into with a (status, error) pair for every file: (OK, None) when it decoded."""
    return [r or (shards.OK, None) for r in folders.decode_into(paths, out, size, mode)]


def decode_nvjpeg(paths: list[str], size: int, channels: int, device: torch.device):
    """Batched nvJPEG decode on the GPU; non-JPEGs, and every JPEG of a batch nvJPEG refuses, go to PIL one by one.

    torchvision's batched CUDA decode returns no partial result when one image fails, so a bad file
    costs its batch a CPU pass; results differ from PIL's in the last bits (no draft(), torch resize).
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    from mixem.data import to_size

    n = len(paths)
    out = torch.zeros((n, channels, size, size), dtype=torch.uint8, device=device)
    status: list = [None] * n
    jpeg = [i for i, p in enumerate(paths) if p.lower().endswith(_JPEG)]
    cpu = [i for i, p in enumerate(paths) if not p.lower().endswith(_JPEG)]
    if jpeg:
        try:
            data = [torch.from_numpy(np.fromfile(paths[i], dtype=np.uint8)) for i in jpeg]
            mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
            with _NVJPEG_LOCK:  # prefetching threads share torchvision's one CUDA decoder
                images = decode_jpeg(data, mode=mode, device=device, apply_exif_orientation=True)
            for i, im in zip(jpeg, images):
                out[i] = to_size(im[None], size)[0]
                status[i] = (shards.OK, None)
        except Exception:  # noqa: BLE001 (unreadable file, CMYK/progressive quirk, nvJPEG error: PIL decides)
            cpu = sorted(cpu + jpeg)
    if cpu:
        buf = np.zeros((len(cpu), channels, size, size), np.uint8)
        for i, r in zip(cpu, decode_into([paths[i] for i in cpu], buf, size, "L" if channels == 1 else "RGB")):
            status[i] = r
        out[torch.as_tensor(cpu, device=device)] = torch.from_numpy(buf).to(device)
    return out, status


def _resolve_decoder(decoder: str, device: torch.device) -> str:
    if decoder == "pil":
        return "pil"
    try:
        from torchvision.io import decode_jpeg  # noqa: F401

        has_tv = True
    except ImportError:
        has_tv = False
    if decoder == "nvjpeg" and (device.type != "cuda" or not has_tv):
        raise ConfigError("--decoder nvjpeg needs a CUDA engine device and torchvision; use --decoder pil")
    return "nvjpeg" if device.type == "cuda" and has_tv else "pil"


class _Decoder:
    """Submits batch decodes to a thread pool and hands them back in order; at most prefetch + 1 in flight."""

    def __init__(self, pool: ThreadPoolExecutor, workers: int, size: int, channels: int, how: str, device):
        self.pool, self.workers, self.how, self.device = pool, workers, how, device
        self.size, self.channels = size, channels
        self.mode = "L" if channels == 1 else "RGB"

    def submit(self, paths: list[str]):
        if self.how == "nvjpeg":
            return ("gpu", self.pool.submit(decode_nvjpeg, paths, self.size, self.channels, self.device))
        buf = np.empty((len(paths), self.channels, self.size, self.size), np.uint8)
        # Chunks of a few images per task: enough tasks to keep every worker busy, few enough to be cheap.
        step = max(1, -(-len(paths) // (self.workers * 4)))
        futs = [
            self.pool.submit(decode_into, paths[j : j + step], buf[j : j + step], self.size, self.mode)
            for j in range(0, len(paths), step)
        ]
        return ("cpu", buf, futs)

    @staticmethod
    def result(job):
        if job[0] == "gpu":
            return job[1].result()
        _, buf, futs = job
        return buf, [r for f in futs for r in f.result()]


class _Shard:
    """One shard's rows as they arrive from the engine, until the shard is complete."""

    def __init__(self, shard: int, start: int, paths: list[str], root: str):
        n = len(paths)
        self.shard, self.start, self.n, self.filled = shard, start, n, 0
        self.paths = [f"{root}/{p}" for p in paths]
        self.status, self.errors = [shards.OK] * n, [None] * n
        self.vectors, self.probs = None, None
        self.t0 = time.perf_counter()

    def add(self, at: int, vectors: np.ndarray, probs: np.ndarray, status):
        if self.vectors is None:
            self.vectors = np.zeros((self.n, vectors.shape[1]), np.float16)
            self.probs = np.zeros((self.n, probs.shape[1]), np.float32)
        self.vectors[at : at + len(vectors)] = vectors
        self.probs[at : at + len(probs)] = probs
        for j, (st, err) in enumerate(status):
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
    return vec.astype(np.float16), probs


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


def _clean_tmp(out: Path, mine: set[int]):
    """Remove temporary files a killed run of this rank's shards left (names carry the shard number)."""
    for d in (shards.EMB_DIR, shards.META_DIR, shards.STATS_DIR):
        folder = out / d
        if not folder.is_dir():
            continue
        for name in os.listdir(folder):
            if name.startswith(".") and ".tmp" in name:
                digits = "".join(ch for ch in name.split(".tmp")[0] if ch.isdigit())
                if digits and int(digits[-5:]) in mine:
                    (folder / name).unlink(missing_ok=True)


def embed_folder(
    model: str, images: str | Path, out: str | Path, opts: EmbedOptions | None = None, log: RunLog | None = None
) -> dict:
    """Embed every image under `images` into shards in `out`; returns this rank's summary (see summarize)."""
    opts = opts or EmbedOptions()
    log = log or RunLog(quiet=True)
    out = Path(out)
    rank, world, _ = torchrun_env()
    # Before listing the folder, so a wrong model fails in a second; "auto" is resolved by the engine, once.
    engine = load_embed_engine(model, opts.engine, opts.features, opts.device, opts.batch_size)
    how = _resolve_decoder(opts.decoder, engine.device)
    settings = dict(
        model=str(model),
        engine=opts.engine,
        features=opts.features,
        image_size=engine.image_size,
        in_channels=engine.in_channels,
    )
    t_list = time.perf_counter()
    if rank == 0:
        m = manifest.create(Path(images), out, settings, opts.shard_size)
    else:
        m = manifest.wait_for(Path(images), out, settings, opts.shard_size, opts.manifest_wait_s)
    log.print(
        f"{m.n_files:,} files in {m.n_shards} shards of {m.shard_size:,} "
        f"(manifest {time.perf_counter() - t_list:.1f} s); rank {rank} of {world}"
    )
    mine = manifest.rank_shards(m.n_shards, rank, world)
    done = shards.done_shards(out, m.n_shards)
    todo = [s for s in mine if s not in done]
    _clean_tmp(out, set(todo))
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
        dec = _Decoder(pool, workers, engine.image_size, engine.in_channels, how, engine.device)
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
            vec, probs = _outputs(engine, x, opts.features, bad)
            shard.add(at, vec, probs, status)
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
        rel = m.shard_paths(out, s)
        acc = _Shard(s, start, rel, m.root)
        for j in range(0, len(rel), batch_size):
            yield acc, j, acc.paths[j : j + batch_size]


def _push(pending: deque, specs, dec: _Decoder):
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
    }
    shards.write_shard(out, sh.shard, ids, sh.paths, sh.vectors, sh.probs, sh.status, sh.errors, stats)
    log.event("shard", shard=sh.shard, rows=sh.n, bad=sum(s != shards.OK for s in sh.status))


def summarize(out: Path, m: manifest.Manifest) -> dict:
    """Whole-run counts from the stats files; once every shard is done, writes bad_files.* and summary.json."""
    done = shards.done_shards(out, m.n_shards)
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
    atomic_write_text(out / "bad_files.txt", "".join(f"{b['path']}\t{b['status']}\t{b['error']}\n" for b in bad))
    atomic_write_text(out / "bad_files.jsonl", "".join(json.dumps(b) + "\n" for b in bad))
    res.update(
        {
            "embedded": embedded,
            "skipped": len(bad),
            "skipped_by_status": by_status,
            "dim": dim,
            "features": m.features,
            "bad_files": str(out / "bad_files.txt"),
        }
    )
    atomic_write_text(out / "summary.json", json.dumps(res, indent=2) + "\n")
    return res
