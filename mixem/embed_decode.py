"""embed's decoding: batches of files to uint8 pixels on a thread pool (PIL) or the GPU (nvJPEG), a status per file."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from mixem import folders, jpeg, shards
from mixem.errors import ConfigError

_JPEG = (".jpg", ".jpeg")
_NVJPEG_LOCK = threading.Lock()

_OUTSIDE = ("outside_root", "a link to a file outside the image folder (embed --follow-links follows it)")


def decode_into(
    paths: list[str], out: np.ndarray, size: int, mode: str, root: str | None = None, decoder: str = "pil"
) -> list[tuple[str, str | None]]:
    """folders.decode_into with a (status, error) pair for every file: (OK, None) when it decoded.

    root (resolved): files whose real path leaves it are not read (a link swapped in after the listing)."""
    res: list = [None] * len(paths)
    todo = list(range(len(paths)))
    if root is not None:
        for i in [i for i in todo if not folders.inside(paths[i], root)]:
            out[i], res[i] = 0, _OUTSIDE
        todo = [i for i in todo if res[i] is None]
    if len(todo) == len(paths):
        return [r or (shards.OK, None) for r in folders.decode_into(paths, out, size, mode, decoder)]
    buf = np.zeros((len(todo), *out.shape[1:]), out.dtype)
    for i, r in zip(todo, folders.decode_into([paths[i] for i in todo], buf, size, mode, decoder)):
        out[i], res[i] = buf[todo.index(i)], r or (shards.OK, None)
    return res


def decode_nvjpeg(paths: list[str], size: int, channels: int, device: torch.device, root: str | None = None):
    """Batched nvJPEG decode on the GPU; non-JPEGs, and every JPEG of a batch nvJPEG refuses, go to PIL one by one.

    torchvision's batched CUDA decode returns no partial result when one image fails, so a bad file
    costs its batch a CPU pass; results differ from PIL's in the last bits (no draft(), torch resize).
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    from mixem.data import to_size

    n = len(paths)
    out = torch.zeros((n, channels, size, size), dtype=torch.uint8, device=device)
    status: list = [None] * n
    mine = [i for i, p in enumerate(paths) if root is None or folders.inside(p, root)]
    for i in set(range(n)) - set(mine):
        status[i] = _OUTSIDE
    jpeg = [i for i in mine if paths[i].lower().endswith(_JPEG)]
    cpu = [i for i in mine if not paths[i].lower().endswith(_JPEG)]
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
        for i, r in zip(cpu, decode_into([paths[i] for i in cpu], buf, size, "L" if channels == 1 else "RGB", root)):
            status[i] = r
        out[torch.as_tensor(cpu, device=device)] = torch.from_numpy(buf).to(device)
    return out, status


def resolve_decoder(decoder: str, device: torch.device, log=None) -> str:
    """The decoder embed uses: nvjpeg on a CUDA engine (auto), else PIL; simplejpeg for JPEGs when asked and
    installed (README "Decoding": 1.16-1.26x PIL end to end on 2 cores, under the 1.3x that would make it the
    default); a missing simplejpeg is said in one line and PIL decodes."""
    if decoder == "pil":
        return "pil"
    if decoder == "simplejpeg":
        if jpeg.available():
            return "simplejpeg"
        if log is not None:
            log.print("--decoder simplejpeg: simplejpeg is not installed (pip install simplejpeg); decoding with PIL")
        return "pil"
    try:
        from torchvision.io import decode_jpeg  # noqa: F401

        has_tv = True
    except ImportError:
        has_tv = False
    if decoder == "nvjpeg" and (device.type != "cuda" or not has_tv):
        raise ConfigError("--decoder nvjpeg needs a CUDA engine device and torchvision; use --decoder pil")
    return "nvjpeg" if device.type == "cuda" and has_tv else "pil"


class Decoder:
    """Submits batch decodes to a thread pool and hands them back in order; at most prefetch + 1 in flight."""

    def __init__(self, pool: ThreadPoolExecutor, workers: int, size: int, channels: int, how: str, device, root):
        self.pool, self.workers, self.how, self.device = pool, workers, how, device
        self.size, self.channels, self.root = size, channels, root
        self.mode = "L" if channels == 1 else "RGB"

    def submit(self, paths: list[str]):
        if self.how == "nvjpeg":
            return ("gpu", self.pool.submit(decode_nvjpeg, paths, self.size, self.channels, self.device, self.root))
        buf = np.empty((len(paths), self.channels, self.size, self.size), np.uint8)
        # Chunks of a few images per task: enough tasks to keep every worker busy, few enough to be cheap.
        step = max(1, -(-len(paths) // (self.workers * 4)))
        futs = [
            self.pool.submit(
                decode_into, paths[j : j + step], buf[j : j + step], self.size, self.mode, self.root, self.how
            )
            for j in range(0, len(paths), step)
        ]
        return ("cpu", buf, futs)

    @staticmethod
    def result(job):
        if job[0] == "gpu":
            return job[1].result()
        _, buf, futs = job
        return buf, [r for f in futs for r in f.result()]
