"""The classify command: an embedding run (mixem.embed: sharded, resumable, corrupt-tolerant) plus each file's class.

The folder is an ordinary embedding run (shards, manifest, bad_files.*) that `cluster` and `search` can use
too; once every shard is done, the class of every readable file (mixem.classes: the classes the model's run
was scored by) is written as classes.parquet, one output set (classify.set.json) tied to the run's listing.
A killed run resumes its shards, and the class step, a pure function of the finished shards, runs again.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mixem import classes, manifest, outputs, owner, rundir, shards
from mixem.embed import EmbedOptions, embed_folder, summarize
from mixem.errors import ConfigError
from mixem.kmeans import l2_normalize
from mixem.outputs import OutputSet
from mixem.runlog import RunLog
from mixem.runtime import job_id, torchrun_env

ROW_GROUP = 65536  # rows per parquet row group


def classify_folder(
    model: str, images: str | Path, out: str | Path, opts: EmbedOptions | None = None, log: RunLog | None = None
) -> dict:
    """Embed every image under `images` into `out` (as embed_folder does) and write each readable file's class,
    probability and distance to its class's centre to out/classes.parquet; returns the summary."""
    opts = opts or EmbedOptions()
    log = log or RunLog(quiet=True)
    if opts.features != "embedding":
        raise ConfigError("classify stores the mixture embedding (the classes live there): drop --features backbone")
    found = classes.read(model)  # a damaged classes.json fails before anything is written
    rank, world, _ = torchrun_env()
    if rank > 0:
        return embed_folder(model, images, out, opts, log)  # rank 0 writes the classes once every shard is done
    out = Path(out)
    with rundir.claim(out, "classify", job=job_id()) as claim:
        if claim.stale:
            log.print(f"{out}: taking over from {owner.who(claim.stale)}, which stopped without finishing")
        summary = embed_folder(model, images, out, opts, log)
        m = manifest.load(out)
        if not summary["complete"] and world > 1:
            summary = _wait_for_ranks(out, m, opts.manifest_wait_s) | {"rank": rank, "world": world}
        if not summary["complete"]:
            return summary
        summary.update(write_classes(out, m, found, log))
    return summary


def _wait_for_ranks(out: Path, m: manifest.Manifest, timeout_s: float, poll_s: float = 0.5) -> dict:
    """Rank 0 of a torchrun job: wait for the other ranks' shards, then the whole run's summary."""
    deadline = time.monotonic() + timeout_s
    while len(shards.done_shards(out, m)) < m.n_shards and time.monotonic() < deadline:
        time.sleep(poll_s)
    return summarize(out, m)


def write_classes(out: Path, m: manifest.Manifest, found: classes.Classes | None, log: RunLog) -> dict:
    """classes.parquet from the finished shards: image_path, id, class, [class_name,] probability, distance."""
    x, cols = shards.read_ok(out, m.n_shards)
    probs = cols["mixture_probs"]
    cls = found or classes.head_only(probs.shape[1])
    got = classes.assign(cls, l2_normalize(x), probs)
    columns = {
        "image_path": pa.array(cols["image_path"], pa.string()),
        "id": pa.array(cols["id"], pa.int64()),
        "class": pa.array(got["class"].astype(np.int32)),
    }
    if cls.names:
        columns["class_name"] = pa.array([cls.names[c] for c in got["class"]], pa.string())
    columns["probability"] = pa.array(got["probability"].astype(np.float32))
    columns["distance"] = pa.array(got["distance"].astype(np.float32))
    table = pa.table(columns)
    with OutputSet(out, rundir.CLASSIFY_SET, tie=rundir.cluster_tie(m)) as outs:
        outs.write(rundir.CLASSIFIED, lambda p: pq.write_table(table, p, row_group_size=ROW_GROUP))
    sizes = np.bincount(got["class"], minlength=cls.k)
    log.print(
        f"{len(table):,} files classified into {cls.k} classes by {cls.by} ({cls.where}); "
        f"sizes {sizes.min():,}..{sizes.max():,} -> {out / rundir.CLASSIFIED}"
    )
    return {
        "classes": str(out / rundir.CLASSIFIED),
        "classified": len(table),
        "classes_from": cls.where,
        "class_sizes": {cls.name(c): int(n) for c, n in enumerate(sizes)},
    }


def read_classified(out: str | Path) -> pa.Table:
    """classes.parquet of a finished classify run, checked to belong to the run's current listing."""
    out = Path(out)
    m = rundir.load_complete(out)
    outputs.read_set(
        out, rundir.CLASSIFY_SET, rundir.cluster_tie(m), rerun=f"mixem-fast classify MODEL IMAGES --out {out}"
    )
    return pq.read_table(out / rundir.CLASSIFIED)
