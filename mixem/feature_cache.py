"""The representation's features kept in its checkpoint: one extraction serves the runs that start from it.

Refinement starts from the features of the newest epoch checkpoint (the representation) on the run's images:
neighbour mining, the k-means start and the head's fit read them, and the final table's representation rows read
them again. Where the crops are chosen (mixem.candidates) the kept candidate's representation starts three more
runs, each in its own process: every draw's neighbour stage (mixem.draws) and OUT's evaluation. A run with
TrainConfig.keep_features (the candidates set it) writes FILE into that checkpoint's folder when it extracts them;
the folder's copies (OUT's, the draws': promote and prepare link the file instead of copying it) carry it along, and
a run from any of them reads it instead of extracting again (about 2 s on one thread of the quickstart per draw,
1 s at the end of OUT's run, measured). What is read is what would be extracted: the same weights, images and
device type, and extract_features gives the same values at 1 and 2 threads on this CPU (measured). A file for
other images (their shape and a BLAKE2 digest of their bytes) or another device type, or one that does not load,
is not read: the features are extracted again (and written over it when keep_features is set).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from mixem import checkpoint as ckpt
from mixem.files import atomic_write

FILE = "features.npz"
NAMES = ("backbone", "embedding", "top_component", "probs")  # extract_features' arrays


def key(images, device) -> str:
    """What the features belong to besides the weights: the images' shape and content, the device type."""
    x = np.ascontiguousarray(torch.as_tensor(images).cpu().numpy())
    digest = hashlib.blake2b(memoryview(x).cast("B"), digest_size=16).hexdigest()
    return f"{'x'.join(map(str, x.shape))} {digest} {torch.device(device).type}"


def read(folder: Path, images_key: str) -> dict[str, np.ndarray] | None:
    """The features kept in a checkpoint folder for these images and device type, else None."""
    try:
        with np.load(Path(folder) / FILE, allow_pickle=False) as z:
            if str(z["key"]) != images_key:
                return None
            return {name: z[name] for name in NAMES}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # none yet, or not a whole file of ours
        return None


def write(folder: Path, feats: dict[str, np.ndarray], images_key: str) -> None:
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to the temporary name
            np.savez(f, key=np.array(images_key), **{name: feats[name] for name in NAMES})

    atomic_write(Path(folder) / FILE, save)


def representation_features(model, images, run_dir, device, *, keep: bool) -> dict[str, np.ndarray]:
    """extract_features of `model`, the run's newest epoch checkpoint, on `images`: read from that checkpoint's
    folder when it holds them, else extracted (and written there when `keep`)."""
    from mixem.evaluate import extract_features

    folder = ckpt.newest(run_dir, "epoch")
    # The images' digest only where a file is kept or to be written (a run without candidates hashes nothing).
    wanted = folder is not None and (keep or (folder / FILE).is_file())
    images_key = key(images, device) if wanted else ""
    found = read(folder, images_key) if wanted else None
    if found is not None:
        return found
    feats = extract_features(model, images, device=device)
    if keep and folder is not None:
        write(folder, feats, images_key)
    return feats


def copy_checkpoint(src: Path, dst: Path) -> None:
    """shutil.copytree of a checkpoint folder, its FILE hard-linked where the file system allows (it is only ever
    replaced whole, never written in place): the features of a large set are not copied twice."""

    def copy(s: str, d: str) -> None:
        if Path(s).name == FILE:
            try:
                os.link(s, d)
                return
            except OSError:
                pass
        shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=copy)
