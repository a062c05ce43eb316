"""report.html: one self-contained page (no network) with cluster sizes and a thumbnail grid per cluster."""

from __future__ import annotations

import base64
import html
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from mixem.files import atomic_write_text
from mixem.folders import default_threads, inside

THUMB = 96  # thumbnail side in pixels
MAX_THUMBS = 6000  # page budget: ~3 KB each, so the page stays under ~20 MB however large k is

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 8px} h2{font-size:17px;margin:24px 0 6px}
.meta{color:#555;font-size:13px;margin-bottom:16px} table{border-collapse:collapse;font-size:13px}
td,th{padding:2px 10px;text-align:right} th{text-align:left;font-weight:600} td.b{text-align:left}
.bar{background:#4a7bd0;height:10px;display:inline-block;vertical-align:middle}
.grid{display:flex;flex-wrap:wrap;gap:4px} .grid img{width:96px;height:96px;object-fit:cover;border:1px solid #ddd;
background:#fff} .sub{color:#666;font-size:12px}
"""


def thumbnail(path: str, root: str | None = None) -> str | None:
    """A data: URI of a small JPEG of the image, or None when it cannot be read (or, with root, leaves root)."""
    if root is not None and not inside(path, root):
        return None  # a link out of the image folder (swapped in since embedding): never shown
    try:
        with Image.open(path) as im:
            im.draft("RGB", (THUMB, THUMB))
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
    except Exception:  # noqa: BLE001 (a file that vanished or broke since embedding just has no thumbnail)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _pick(assign: np.ndarray, distances: np.ndarray, k: int, per: int) -> list[np.ndarray]:
    """Per cluster, the `per` rows closest to its centroid: the most typical members first."""
    order = np.lexsort((distances, assign))  # by cluster, then distance
    starts = np.searchsorted(assign[order], np.arange(k + 1))
    return [order[starts[c] : min(starts[c + 1], starts[c] + per)] for c in range(k)]


def write_report(
    path: Path,
    rel: list[str],
    root: str,
    assign: np.ndarray,
    distances: np.ndarray,
    k: int,
    metrics: dict,
    labels: np.ndarray | None = None,
    classes: list[str] | None = None,
    per_cluster: int = 24,
    follow_links: bool = False,
):
    """Write the page: summary, a size table (with the majority label when labels exist), then the grids.

    follow_links=False: thumbnails only of files inside root (links out of it are not followed)."""
    per = max(1, min(per_cluster, MAX_THUMBS // max(k, 1)))
    picks = _pick(assign, distances, k, per)
    sizes = np.bincount(assign, minlength=k)
    flat = np.concatenate(picks) if picks else np.zeros(0, np.int64)
    with ThreadPoolExecutor(max_workers=default_threads()) as pool:
        real = None if follow_links else os.path.realpath(root)
        uris = dict(zip(flat.tolist(), pool.map(thumbnail, [f"{root}/{rel[i]}" for i in flat], [real] * len(flat))))
    esc = html.escape
    head = ", ".join(f"{key} {metrics[key]:.4f}" for key in ("acc", "nmi", "ari") if key in metrics)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>mixem-fast clusters ({k})</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{k} clusters of {len(assign):,} images</h1>",
        f"<div class='meta'>init {esc(str(metrics.get('init')))}; features {esc(str(metrics.get('features')))}; "
        f"k-means {esc(str(metrics.get('kmeans')))}; objective {metrics.get('objective', 0):.6g}"
        + (f"; vs {esc(str(metrics.get('labels')))}: {head}" if head else "")
        + "</div>",
        "<table><tr><th>cluster</th><th>images</th><th></th>"
        + ("<th>majority label</th>" if labels is not None else "")
        + "</tr>",
    ]
    top = max(int(sizes.max()), 1) if k else 1
    if labels is not None:  # (k, L) cluster-by-label counts in one pass over the N rows
        n_lab = int(labels.max()) + 1
        table = np.bincount(assign.astype(np.int64) * n_lab + labels, minlength=k * n_lab).reshape(k, n_lab)
    for c in range(k):
        cell = ""
        if labels is not None and sizes[c]:
            best = int(table[c].argmax())
            name = classes[best] if classes else str(best)
            cell = f"<td>{esc(name)} ({table[c, best] / sizes[c]:.0%})</td>"
        parts.append(
            f"<tr><td><a href='#c{c}'>{c}</a></td><td>{sizes[c]:,}</td>"
            f"<td class='b'><span class='bar' style='width:{200 * sizes[c] // top}px'></span></td>{cell}</tr>"
        )
    parts.append("</table>")
    for c in range(k):
        parts.append(
            f"<h2 id='c{c}'>cluster {c} <span class='sub'>{sizes[c]:,} images; "
            f"{len(picks[c])} closest to the centre shown</span></h2><div class='grid'>"
        )
        for i in picks[c].tolist():
            uri = uris.get(i)
            title = esc(rel[i], quote=True)
            parts.append(
                f"<img src='{uri}' title='{title}' alt='{title}'>"
                if uri
                else f"<span class='sub' title='{title}'>unreadable</span>"
            )
        parts.append("</div>")
    parts.append("</body></html>\n")
    atomic_write_text(path, "\n".join(parts))
