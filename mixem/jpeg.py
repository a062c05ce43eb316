"""JPEG decoding with simplejpeg (libjpeg-turbo, DCT-scaled, straight into numpy): `--decoder simplejpeg`.

The same picture as folders.decode's PIL path: EXIF-upright, decoded at the largest libjpeg scale that still
covers size x size (PIL's draft() picks among 1/1, 1/2, 1/4, 1/8; libjpeg-turbo also has the M/8 steps
between), shorter side resized and centre-cropped with PIL's bilinear resize. What it cannot do the way PIL
does (CMYK and other colour spaces, a file libjpeg only half reads) it leaves to PIL: decode() returns None.
simplejpeg is optional (`pip install simplejpeg`, or mixem-fast[fast]); without it PIL decodes everything.
"""

from __future__ import annotations

import struct

import numpy as np
from PIL import Image

try:
    import simplejpeg
except ImportError:  # optional: PIL decodes every file then
    simplejpeg = None

SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")
ORIENTATION = 0x0112


def available() -> bool:
    return simplejpeg is not None


def is_jpeg_name(path: str) -> bool:
    return path.lower().endswith(SUFFIXES)


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1..8) of a JPEG's APP1 segment; 1 when there is none or it cannot be read."""
    pos = 2  # after SOI
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no more headers
            break
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        seg = data[pos + 4 : pos + 2 + length]
        if marker == 0xE1 and seg[:6] == b"Exif\0\0":
            return _tiff_orientation(seg[6:])
        pos += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    e = "<" if tiff[:2] == b"II" else ">"
    ifd = struct.unpack(e + "I", tiff[4:8])[0]
    if ifd + 2 > len(tiff):
        return 1
    for i in range(struct.unpack(e + "H", tiff[ifd : ifd + 2])[0]):
        entry = tiff[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
        if len(entry) < 12:
            break
        tag, kind = struct.unpack(e + "HH", entry[:4])
        if tag == ORIENTATION and kind == 3:  # SHORT
            value = struct.unpack(e + "H", entry[8:10])[0]
            return value if 1 <= value <= 8 else 1
    return 1


def _upright(a: np.ndarray, orientation: int) -> np.ndarray:
    """PIL's ImageOps.exif_transpose on an (H, W[, C]) array."""
    if orientation in (2, 4, 5, 7):  # the mirrored ones: flip left-right first
        a = a[:, ::-1]
    turns = {3: 2, 4: 2, 5: 1, 6: 3, 7: 3, 8: 1}.get(orientation, 0)  # counter-clockwise quarter turns
    return np.rot90(a, turns) if turns else a


def decode(path: str, size: int, mode: str) -> np.ndarray | None:
    """(C, size, size) uint8 like folders.decode, or None for a file PIL should decode (see the module doc).

    Raises PIL's DecompressionBombError for an image past PIL's pixel limit at its decoded scale, and OSError
    for a file that cannot be read: folders.failure() turns both into the file's status."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("Gray", "YCbCr", "RGB"):
            return None  # CMYK / YCCK: PIL's conversion
        a = simplejpeg.decode_jpeg(
            data, colorspace="GRAY" if mode == "L" else "RGB", min_height=size, min_width=size, strict=True
        )
    except ValueError:  # not a JPEG after all, or a damaged one: PIL decides and words the failure
        return None
    limit = Image.MAX_IMAGE_PIXELS
    if limit and a.shape[0] * a.shape[1] > limit:
        raise Image.DecompressionBombError(f"{w}x{h} pixels exceeds the {limit}-pixel limit")
    a = _upright(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a, exif_orientation(data))
    im = Image.fromarray(np.ascontiguousarray(a))
    W, H = im.size
    side = min(W, H)
    box = ((W - side) / 2, (H - side) / 2, (W + side) / 2, (H + side) / 2)
    out = np.asarray(im.resize((size, size), Image.BILINEAR, box=box, reducing_gap=3.0))
    return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)
