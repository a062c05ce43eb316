"""report.html of a cluster run: one self-contained page (no network): map, heat-map, clusters, near-duplicates."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from mixem import report_assets
from mixem import report_plots as plots
from mixem import report_stats as stats
from mixem.files import atomic_write_text
from mixem.folders import default_threads, inside

THUMB = 96  # thumbnail side in pixels
MAX_THUMBS = 5000  # cluster grids: the page stays small however large k is
THUMB_BYTES = 16 * 2**20  # and however large the thumbnails come out: later ones are left out past this
DUP_GROUPS, DUP_PER_GROUP = 30, 8  # near-duplicate groups shown, images shown per group


@dataclass
class Page:
    """What the page is made from: the run's rows (read_ok order), its clustering, labels and duplicates."""

    rel: list[str]  # each row's path relative to the image folder
    root: str  # the image folder
    x: np.ndarray  # (N, D) the embeddings
    res: object  # KMeansResult: assign, distances, centroids
    metrics: dict  # metrics.json (settings, scores, k scan, duplicates)
    labels: np.ndarray | None = None
    classes: list[str] | None = None  # label names
    dup: object | None = None  # mixem.duplicates.Duplicates
    per_cluster: int = 24
    follow_links: bool = False


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


def _thumbnails(page: Page, rows: list[int]) -> dict[int, str | None]:
    """Thumbnails of rows in order of priority; rows past the byte budget get none."""
    real = None if page.follow_links else os.path.realpath(page.root)
    with ThreadPoolExecutor(max_workers=default_threads()) as pool:
        uris = list(pool.map(thumbnail, [f"{page.root}/{page.rel[i]}" for i in rows], [real] * len(rows)))
    out, total = {}, 0
    for i, u in zip(rows, uris):
        total += len(u or "")
        out[i] = u if total <= THUMB_BYTES else "budget"
    return out


class _Html:
    """The page as a list of parts; thumbnails by row, each embedded once and referenced by id after."""

    def __init__(self, uris: dict[int, str | None], rel: list[str]):
        self.parts, self.uris, self.rel, self.placed = [], uris, rel, set()

    def add(self, *parts: str):
        self.parts.extend(parts)

    def grid(self, rows, caption=lambda i: ""):
        self.add("<div class='grid'>")
        for i in (int(r) for r in rows):
            title = html.escape(self.rel[i] + caption(i), quote=True)
            uri = self.uris.get(i)
            if uri is None or uri == "budget":
                why = "unreadable" if uri is None else "not shown (page size budget)"
                self.add(f"<span class='miss' title='{title}'>{why}</span>")
            elif i in self.placed:
                self.add(f"<img class='r{i}' title='{title}' alt='' src='{uri}'>")
            else:
                self.placed.add(i)
                self.add(f"<img id='t{i}' class='r{i}' title='{title}' alt='' src='{uri}'>")
        self.add("</div>")


def write_report(path: Path, page: Page) -> float:
    """Write the page; returns the seconds it took."""
    t0 = time.perf_counter()
    res, k = page.res, len(page.res.centroids)
    per = max(1, min(page.per_cluster, MAX_THUMBS * 2 // (3 * max(k, 1))))
    near, far = stats.picks(res.assign, res.distances, k, per, max(1, per // 2))
    groups = list(page.dup.groups[:DUP_GROUPS]) if page.dup is not None else []
    groups = [g[:DUP_PER_GROUP] for g in groups]
    order = [
        *(int(i) for g in near for i in g),
        *(int(i) for g in far for i in g),
        *(int(i) for g in groups for i in g),
    ]
    uris = _thumbnails(page, list(dict.fromkeys(order)))
    rows = stats.cluster_rows(res, k, page.labels, page.classes)
    h = _Html(uris, page.rel)
    h.add(_head(k, len(res.assign)), _summary(page, rows))
    _map_section(h, page, np.array(order, dtype=np.int64), k)
    if page.metrics.get("k_scan"):
        scan = page.metrics["k_scan"]
        h.add("<h2>Choosing k</h2>", f"<p class='meta'>{_scan_text(scan)}</p>")
        h.add(
            f"<img class='fig' alt='k scan' src='{plots.kscan_figure(scan['rows'], scan['best'], scan['criterion'])}'>"
        )
    if page.labels is not None:
        _heatmap_section(h, page, rows, k)
    _cluster_table(h, rows, page.labels is not None, k)
    _duplicates_section(h, page, groups)
    for c in range(k):
        _cluster_section(h, c, rows[c], near[c], far[c], res.distances, k)
    h.add(f"<script>{report_assets.MAP_JS}</script></body></html>\n")
    atomic_write_text(path, "\n".join(h.parts))
    return round(time.perf_counter() - t0, 3)


def _head(k: int, n: int) -> str:
    css = report_assets.CSS
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>mixem-fast: {k} clusters of {n:,} images</title>"
        f"<style>{css}</style></head><body><div id='tip'></div><h1>{k} clusters of {n:,} images</h1>"
    )


def _summary(page: Page, rows: list[dict]) -> str:
    m, esc = page.metrics, html.escape
    how = (
        f"assigned to the given centroids {esc(str(m.get('centroids')))}"
        if m.get("centroids")
        else f"k-means (init {esc(str(m.get('init')))}, {esc(str(m.get('kmeans')))})"
    )
    line = f"{how}; features {esc(str(m.get('features')))}; objective {m.get('objective', 0):.6g}"
    if page.labels is not None:
        scores = ", ".join(f"{key.upper()} {m[key]:.4f}" for key in ("acc", "nmi", "ari") if key in m)
        pur = stats.purity(page.res.assign, page.labels, len(rows))
        line += f"<br>against {esc(str(m.get('labels')))}: {scores}, purity {pur:.4f}"
    return f"<div class='meta'>{line}</div>"


def _scan_text(scan: dict) -> str:
    return (
        f"--k auto scanned k = {scan['range'][0]}..{scan['range'][1]}: k-means++ (2 restarts) on a random "
        f"{scan['points']:,} of the images for every k, each scored by its {html.escape(scan['criterion'])} on "
        f"{scan['silhouette_points']:,} of them; k = {scan['best']} scored highest (clustering all images then "
        f"used it)."
    )


def _map_section(h: _Html, page: Page, shown: np.ndarray, k: int) -> None:
    sample = stats.map_sample(len(page.x), shown)
    xy, share = stats.pca2(page.x[sample])
    uri, frac = plots.map_figure(xy, page.res.assign[sample], k, share)
    thumbs = {i for i, u in h.uris.items() if u and u != "budget"}
    data = {
        "x": np.round(frac[:, 0], 4).tolist(),
        "y": np.round(frac[:, 1], 4).tolist(),
        "c": page.res.assign[sample].tolist(),
        "r": [int(i) if int(i) in thumbs else -1 for i in sample],
        "p": [page.rel[i] for i in sample],
    }
    h.add(
        "<h2>Map</h2><p class='meta'>"
        f"{len(sample):,} of the {len(page.x):,} images (every one shown below, the rest at random), on the two "
        "principal components of the embedding (PCA: linear and deterministic, so what is apart here is apart "
        "in the embedding; t-SNE or UMAP would separate clusters more but distort the distances between them and "
        "cost far more time). Hover over a point for its image and path; click it to go to its cluster.</p>",
        f"<div class='mapbox'><img id='map' alt='map of the embeddings' src='{uri}'></div>",
        "<script type='application/json' id='mapdata'>" + json.dumps(data).replace("</", "<\\/") + "</script>",
    )


def _heatmap_section(h: _Html, page: Page, rows: list[dict], k: int) -> None:
    table = stats.confusion(page.res.assign, page.labels, k)
    names = page.classes or [str(i) for i in range(table.shape[1])]
    order = np.lexsort((-table.sum(1), table.argmax(1)))  # grouped by majority label, larger first
    h.add(
        "<h2>Clusters against labels</h2><p class='meta'>Each row a cluster, each column a label: the share of the "
        "cluster's images with that label (the number of images written in). A pure cluster is one dark cell.</p>",
        f"<img class='fig' alt='cluster by label heat-map' src='{plots.heatmap_figure(table, order, names)}'>",
    )


def _cluster_table(h: _Html, rows: list[dict], labelled: bool, k: int) -> None:
    cols = plots.colors(k)
    top = max([r["size"] for r in rows] + [1])
    h.add(
        "<h2>Clusters</h2><table><tr><th>cluster</th><th>images</th><th></th><th>mean distance to the centre</th>"
        "<th>nearest other cluster (centre distance)</th>"
        + ("<th>majority label</th><th>purity</th>" * labelled)
        + "</tr>"
    )
    for r in rows:
        c = r["cluster"]
        near = f"<a href='#c{r['nearest']}'>{r['nearest']}</a> ({r['nearest_distance']:.3f})" if "nearest" in r else "-"
        mean = "-" if r["mean_distance"] is None else f"{r['mean_distance']:.4f}"
        lab = f"<td class='b'>{html.escape(r['label'])}</td><td>{r['purity']:.0%}</td>" if "label" in r else ""
        lab = lab or ("<td></td><td></td>" if labelled else "")
        h.add(
            f"<tr><td class='b'><span class='sw' style='background:{plots.hex_color(cols[c])}'></span>"
            f"<a href='#c{c}'>{c}</a></td><td>{r['size']:,}</td><td class='b'><span class='bar' "
            f"style='width:{200 * r['size'] // top}px'></span></td><td>{mean}</td><td>{near}</td>{lab}</tr>"
        )
    h.add("</table>")


def _duplicates_section(h: _Html, page: Page, groups: list[np.ndarray]) -> None:
    info = page.metrics.get("duplicates")
    h.add("<h2 id='duplicates'>Near-duplicates</h2>")
    if not info or not info.get("available"):
        why = "not searched (--no-duplicates)" if not info else "not available: this run has no fingerprints"
        why = f"none listed: {info['why']}" if info and info.get("why") else why
        h.add(f"<p class='meta'>{why}.</p>")
        return
    d = page.dup
    h.add(
        f"<p class='meta'><b>{len(d.i):,} pair{'s' * (len(d.i) != 1)}</b> of images at cosine similarity <b>&ge; {d.threshold}</b> of their "
        f"fingerprints (the low 8&times;8 DCT frequencies of each image as the model sees it), in "
        f"<b>{len(d.groups):,} group{'s' * (len(d.groups) != 1)}</b> of {d.images:,} images; found by {html.escape(d.how)} "
        f"in {d.seconds} s. Every pair is in duplicates.parquet. "
        + (f"The {len(groups)} largest groups:" if groups else "")
        + "</p>"
    )
    sim = {}
    for i, j, s in zip(d.i[:200_000].tolist(), d.j[:200_000].tolist(), d.similarity[:200_000].tolist()):
        sim.setdefault(i, s)
        sim.setdefault(j, s)
    for g, rows in enumerate(groups):
        h.add(f"<div class='dg'><div class='sub'>group {g}: {len(d.groups[g]):,} images</div>")
        h.grid(rows, lambda i: f" (best pair cosine {sim.get(i, float('nan')):.4f})")
        h.add("</div>")


def _cluster_section(h: _Html, c: int, row: dict, near, far, distances, k: int) -> None:
    colour = plots.hex_color(plots.colors(k)[c])
    facts = [f"{row['size']:,} images"]
    if row["mean_distance"] is not None:
        facts.append(f"mean distance to the centre {row['mean_distance']:.4f}")
    if "nearest" in row:
        facts.append(f"nearest cluster <a href='#c{row['nearest']}'>{row['nearest']}</a>")
    if "label" in row:
        facts.append(f"majority label {html.escape(row['label'])} ({row['purity']:.0%})")
    h.add(
        f"<h2 id='c{c}'><span class='sw' style='background:{colour}'></span>cluster {c} "
        f"<span class='sub'>{'; '.join(facts)}</span></h2>",
        f"<div class='sub'>most typical: the {len(near)} closest to the centre</div>",
    )
    h.grid(near, lambda i: f" (distance {distances[i]:.4f})")
    if len(far):
        h.add(f"<div class='sub'>most atypical: the {len(far)} farthest from the centre</div>")
        h.grid(far, lambda i: f" (distance {distances[i]:.4f})")
