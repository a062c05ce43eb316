"""simplejpeg decoding (mixem.jpeg) against PIL's path on real photos: orientation, scale, colour, failures."""

import numpy as np
import pytest
from PIL import Image, ImageOps
from sklearn.datasets import load_sample_images

from mixem import folders, jpeg
from mixem.embed_decode import resolve_decoder

pytestmark = pytest.mark.skipif(not jpeg.available(), reason="simplejpeg is not installed (pip install simplejpeg)")


@pytest.fixture(scope="module")
def photo():
    return load_sample_images().images[1][40:341, 10:471]  # a real photo, 301 x 461 (odd sides)


def _save(path, array, mode="RGB", orientation=None, **kw):
    im = Image.fromarray(array).convert(mode)
    if orientation is not None:
        exif = Image.Exif()
        exif[jpeg.ORIENTATION] = orientation
        kw["exif"] = exif
    im.save(path, "JPEG", quality=90, **kw)
    return str(path)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_upright_like_pil(tmp_path, photo, orientation):
    path = _save(tmp_path / "o.jpg", photo, orientation=orientation)
    data = open(path, "rb").read()
    assert jpeg.exif_orientation(data) == orientation
    full = np.asarray(ImageOps.exif_transpose(Image.open(path)))
    import simplejpeg

    np.testing.assert_array_equal(jpeg._upright(simplejpeg.decode_jpeg(data), orientation), full)
    # Through the decoder: at full scale (size 280 < the shorter side) the same pixels as PIL's path.
    got = folders.decode(path, 280, "RGB", decoder="simplejpeg")
    want = folders.decode(path, 280, "RGB", decoder="pil")
    assert got.shape == want.shape == (3, 280, 280)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("size", [16, 37, 64, 150])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_scaled_decode_stays_close_to_pils_draft(tmp_path, photo, size, mode):
    # libjpeg scales by M/8, PIL's draft() by 1/2^n only: the crops agree to a few levels on average.
    path = _save(tmp_path / "s.jpg", photo)
    got = folders.decode(path, size, mode, decoder="simplejpeg").astype(np.int16)
    want = folders.decode(path, size, mode, decoder="pil").astype(np.int16)
    assert got.shape == want.shape == ((1 if mode == "L" else 3), size, size)
    assert np.abs(got - want).mean() < 4.0, np.abs(got - want).mean()


def test_what_simplejpeg_declines_is_pils(tmp_path, photo):
    cmyk = _save(tmp_path / "cmyk.jpg", photo, mode="CMYK")
    assert jpeg.decode(cmyk, 32, "RGB") is None
    np.testing.assert_array_equal(
        folders.decode(cmyk, 32, "RGB", decoder="simplejpeg"), folders.decode(cmyk, 32, "RGB", decoder="pil")
    )
    png_named_jpg = tmp_path / "really.png.jpg"
    Image.fromarray(photo).save(png_named_jpg, "PNG")
    assert jpeg.decode(str(png_named_jpg), 32, "RGB") is None
    np.testing.assert_array_equal(
        folders.decode(str(png_named_jpg), 32, "RGB", decoder="simplejpeg"),
        folders.decode(str(png_named_jpg), 32, "RGB", decoder="pil"),
    )


def test_failures_get_the_same_status_as_with_pil(tmp_path, photo, monkeypatch):
    good = _save(tmp_path / "good.jpg", photo)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(open(good, "rb").read()[:300])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    paths = [good, str(truncated), str(empty), str(tmp_path / "missing.jpg")]
    for decoder in ("pil", "simplejpeg"):
        out = np.full((4, 3, 24, 24), 7, np.uint8)
        res = folders.decode_into(paths, out, 24, "RGB", decoder)
        assert res[0] is None and [r[0] for r in res[1:]] == ["corrupt", "corrupt", "unreadable"], (decoder, res)
        assert (out[1:] == 0).all()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the photo at its decoded scale is past it
    out = np.zeros((1, 3, 24, 24), np.uint8)
    assert folders.decode_into([good], out, 24, "RGB", "simplejpeg")[0][0] == "too_large"


def test_simplejpeg_when_asked_and_pil_when_it_is_missing(monkeypatch, capsys):
    import torch

    from mixem.runlog import RunLog

    cpu = torch.device("cpu")
    assert resolve_decoder("simplejpeg", cpu) == "simplejpeg"
    assert resolve_decoder("auto", cpu) == resolve_decoder("pil", cpu) == "pil"  # below the 1.3x bar: PIL
    monkeypatch.setattr(jpeg, "simplejpeg", None)  # as if it were not installed
    assert resolve_decoder("simplejpeg", cpu, RunLog()) == "pil"
    assert "simplejpeg is not installed" in capsys.readouterr().out
