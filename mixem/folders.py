"""Image folders: list the image files under a root and decode them in parallel to uint8 NCHW squares."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from mixem import jpeg
from mixem.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})


def list_images(root: Path, follow_links: bool = True, left_out: list[str] | None = None) -> list[str]:
    """Relative POSIX paths of the image files under root, sorted; hidden files and folders left out (iter_images)."""
    return list(iter_images(root, follow_links, left_out))


def iter_images(root: Path, follow_links: bool = True, left_out: list[str] | None = None) -> Iterator[str]:
    """The relative POSIX paths of the image files under root, yielded in sorted (code point) order while the
    folder is walked: one folder's entries in memory at a time, never the whole listing. Each folder's entries
    are sorted by name, a sub-folder's as name + "/": every path below it starts with exactly that, so the walk
    yields what sorting all the paths would. Hidden files and folders (and __MACOSX) are left out.

    follow_links=False: links (to files or folders) whose target lies outside root are not followed; their
    relative paths are appended to `left_out`. Links that stay inside root are followed either way. A folder
    reached twice (linked twice) is walked once, where it comes first; a link up to the root or above it (a
    loop) adds nothing.
    """
    root = os.fspath(root)
    top = os.path.realpath(root)
    seen: set[str] = set()

    def enter(dirpath: str) -> Iterator[tuple[str, str, bool]] | None:
        real = os.path.realpath(dirpath)
        if real in seen or (seen and (top == real or top.startswith(real.rstrip(os.sep) + os.sep))):
            return None
        seen.add(real)
        return iter(_entries(dirpath))

    first = enter(root)
    stack = [(root, "", first)] if first is not None else []
    while stack:
        dirpath, rel, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        _, name, is_dir = entry
        path, relpath = os.path.join(dirpath, name), (f"{rel}/{name}" if rel else name)
        if not follow_links and leaves(path, top):
            if left_out is not None:
                left_out.append(relpath)
            continue
        if not is_dir:
            yield relpath
        elif (sub := enter(path)) is not None:
            stack.append((path, relpath, sub))


def _entries(dirpath: str) -> list[tuple[str, str, bool]]:
    """(sort key, name, is a folder) of a folder's image files and sub-folders, sorted; [] when unreadable."""
    try:
        with os.scandir(dirpath) as it:
            found = list(it)
    except OSError:
        return []  # as os.walk: a folder that cannot be listed adds nothing
    out = []
    for e in found:
        name = e.name
        if name.startswith("."):  # hidden: copies (.ipynb_checkpoints), metadata (.git), "._x.jpg" AppleDouble
            continue
        try:
            is_dir = e.is_dir()  # links followed: a link to a folder is a folder (leaves() decides on it)
        except OSError:
            is_dir = False
        if is_dir:
            if name != "__MACOSX":  # AppleDouble files
                out.append((name + "/", name, True))
        elif os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
            out.append((name, name, False))
    out.sort()
    return out


def leaves(path: str, real_root: str) -> bool:
    """Is path a link whose target lies outside real_root? (A path that is no link stays where its folder is.)"""
    return os.path.islink(path) and not inside(path, real_root)


def inside(path: str, real_root: str) -> bool:
    """Does path, links resolved, lie under real_root (itself resolved)?"""
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _to_mode(im: Image.Image, mode: str) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit scans: PIL's own conversion clips to 255 instead of scaling.
        a = np.asarray(im, dtype=np.int64)
        a = a >> 8 if a.max(initial=0) > 255 else a
        im = Image.fromarray(a.clip(0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float32)
        a = a * 255 if a.max(initial=0) <= 1 else a
        im = Image.fromarray(np.rint(a).clip(0, 255).astype(np.uint8), "L")
    elif im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Transparent pixels carry arbitrary colour (often black): show them on white, as a viewer does.
        rgba = im.convert("RGBA")
        im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im.alpha_composite(rgba)
    return im if im.mode == mode else im.convert(mode)


def probe(root: Path, n: int) -> tuple[int, int]:
    """(channels, median shorter side) of up to n images spread over the folder; unreadable files are passed over.

    A file counts as colour when its channels differ by more than 8 levels somewhere in a 32 px thumbnail
    (grayscale photos saved as RGB do not)."""
    files = list_images(root)
    if not files:
        raise DataError(f"{root}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found")
    picked = files[:: max(1, len(files) // n)][:n]
    colour, sides = False, []
    for rel in picked:
        try:
            with Image.open(root / rel) as im:
                sides.append(min(im.size))
                rgb = np.asarray(_to_mode(ImageOps.exif_transpose(im), "RGB").resize((32, 32)), dtype=np.int16)
        except Exception:  # the full read reports it; a probe only skips it
            continue
        colour |= bool(np.abs(rgb - rgb[..., :1]).max() > 8)
    if not sides:
        raise DataError(f"{root}: none of {len(picked)} sampled image files could be read")
    return (3 if colour else 1), int(np.median(sides))


def decode(path: str, size: int, mode: str, decoder: str = "pil") -> np.ndarray:
    """One image file as (C, size, size) uint8: EXIF-upright, shorter side resized, centre-cropped.

    decoder "simplejpeg": JPEGs by simplejpeg (mixem.jpeg), everything else and what it declines by PIL."""
    if decoder == "simplejpeg" and jpeg.is_jpeg_name(path):
        out = jpeg.decode(path, size, mode)
        if out is not None:
            return out
    # PIL rather than torchvision.io: draft() skips most of the JPEG work for small targets, and it
    # reads bmp/tiff/gif/16-bit files too; it releases the GIL while decoding, so threads scale.
    with Image.open(path) as im:
        # JPEG only: decode at 1/2..1/8 scale when that still covers size x size (much faster for photos).
        im.draft(im.mode, (size, size))
        limit = Image.MAX_IMAGE_PIXELS
        if limit and im.width * im.height > limit:
            # PIL only warns between 1x and 2x its limit; after draft() a big JPEG is small, a bomb is not.
            raise Image.DecompressionBombError(f"{im.width}x{im.height} pixels exceeds the {limit}-pixel limit")
        return square(ImageOps.exif_transpose(im), size, mode)


def square(im: Image.Image, size: int, mode: str) -> np.ndarray:
    """An open image as (C, size, size) uint8 in `mode` ("L" or "RGB"): shorter side resized, centre-cropped."""
    im = _to_mode(im, mode)
    w, h = im.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    a = np.asarray(im.resize((size, size), Image.BILINEAR, box=box, reducing_gap=3.0))
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def failure(e: BaseException) -> tuple[str, str]:
    """(status, one-line reason) of a file that could not be decoded; status is "too_large" (decompression-bomb
    limit), "unreadable" (missing, no permission, not a file) or "corrupt" (the decoder refused it)."""
    if isinstance(e, Image.DecompressionBombError):
        status = "too_large"
    elif isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        status = "unreadable"
    else:
        status = "corrupt"
    text = str(e).splitlines()[0] if str(e) else ""
    return status, (f"{type(e).__name__}: {text}"[:300] if text else type(e).__name__)


def decode_into(
    paths: list[str], out: np.ndarray, size: int, mode: str, decoder: str = "pil"
) -> list[tuple[str, str] | None]:
    """Decode paths into out[i] ((C, size, size) uint8): None per success; a failure zeroes its row and is
    returned as failure()'s (status, reason), never raised: one bad file never stops a run."""
    res: list[tuple[str, str] | None] = []
    for i, p in enumerate(paths):
        try:
            out[i] = decode(p, size, mode, decoder)
            res.append(None)
        except Exception as e:  # noqa: BLE001 (any decoder failure is that file's status, not the run's end)
            out[i] = 0
            res.append(failure(e))
    return res


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def decode_files(
    paths: list[str],
    size: int,
    channels: int,
    *,
    limit: int = 0,
    threads: int = 0,
    progress: Callable[[int, int], None] | None = None,
    decoder: str = "pil",
):
    """Decode paths in order into (N, C, size, size) uint8, stopping at `limit` readable images (0 = all).

    Returns (images, kept indices into paths, skipped (path, reason) pairs).
    """
    mode = "L" if channels == 1 else "RGB"
    target = min(limit, len(paths)) if limit else len(paths)
    buf = np.empty((target, channels, size, size), np.uint8)
    kept, skipped, filled, pos = [], [], 0, 0
    threads = threads or default_threads()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        # Rounds: with a limit, unreadable files are replaced by the next ones in order until it is met.
        while filled < target and pos < len(paths):
            batch = list(range(pos, min(pos + target - filled, len(paths))))
            pos += len(batch)
            step = max(1, min(64, len(batch) // (threads * 4) or 1))
            futures = {}
            for j in range(0, len(batch), step):
                idx = batch[j : j + step]
                out = buf[filled + j : filled + j + len(idx)]
                futures[pool.submit(decode_into, [paths[i] for i in idx], out, size, mode, decoder)] = j
            reasons: list = [None] * len(batch)
            done = 0
            for fut in as_completed(futures):
                r = fut.result()
                reasons[futures[fut] : futures[fut] + len(r)] = r
                done += len(r)
                if progress is not None:
                    progress(filled + done, target)
            good = [j for j, r in enumerate(reasons) if r is None]
            skipped += [(paths[batch[j]], r[1]) for j, r in enumerate(reasons) if r is not None]
            if len(good) < len(batch):
                buf[filled : filled + len(good)] = buf[filled + np.asarray(good, dtype=np.int64)]
            kept += [batch[j] for j in good]
            filled += len(good)
    return buf[:filled], kept, skipped


def read_folder(
    root: Path,
    size: int,
    channels: int,
    *,
    labels: bool,
    limit: int,
    threads: int,
    progress: Callable[[int, int], None] | None,
):
    """Returns (images, labels, class names, paths, skipped) for an image folder."""
    rel = list_images(root)
    if not rel:
        exts = ", ".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))
        raise DataError(f"{root}: no image files found (looked recursively for {exts})")
    paths = [str(root / r) for r in rel]
    images, kept, skipped = decode_files(paths, size, channels, limit=limit, threads=threads, progress=progress)
    if not kept:
        first = f"; first: {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise DataError(f"{root}: none of the {len(skipped)} image files could be read{first}")
    y, names = None, None
    rel_kept = [rel[i] for i in kept]
    # Labels come from first-level sub-folders only when every image lies in one (ImageFolder layout).
    if labels and all("/" in r for r in rel_kept):
        classes = [r.split("/", 1)[0] for r in rel_kept]
        names = sorted(set(classes))
        index = {c: i for i, c in enumerate(names)}
        y = np.array([index[c] for c in classes], dtype=np.int64)
    return images, y, names, [paths[i] for i in kept], skipped
