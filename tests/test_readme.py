"""The README's Python examples run as written, in order, in a folder holding `images/` (real PNGs in class
sub-folders), and print what they say they print."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_python_api_examples_run(tmp_path, monkeypatch):
    from mixem.data import load_images

    ds = load_images(None, image_size=28, in_channels=1, max_images=240)
    for i, (im, y) in enumerate(zip(ds.images[:, 0].numpy(), ds.labels)):
        folder = tmp_path / "images" / ds.class_names[y]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(folder / f"{i:04d}.png")
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks("Python API")
    assert len(blocks) == 3
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for code in blocks:
            exec(compile(code, "README.md", "exec"), namespace)
    printed = out.getvalue().splitlines()
    assert printed[0].startswith("SimCLR + refinement (argmax of the refined head)")  # the cpu preset's method
    assert (tmp_path / "classified" / "classes.parquet").is_file() and (tmp_path / "emb" / "report.html").is_file()
    assert printed[-1] == "1.0"  # the same images assigned to the first run's centroids: the same clusters
    assert len(namespace["pred"]) == 8 and namespace["vectors"].shape[0] == 8
    assert 2 <= namespace["clusters"].k <= 12
