"""The report's figures, drawn with matplotlib (SVG, no pyplot state) and embedded as data: URIs."""

from __future__ import annotations

import base64
import io

import numpy as np

_RC = {"svg.hashsalt": "mixem-fast", "svg.fonttype": "none", "font.size": 9, "axes.spines.top": False}
_RC |= {"axes.spines.right": False}


def colors(k: int) -> np.ndarray:
    """(k, 4) RGBA colours of the clusters: tab10 / tab20, else turbo in a fixed shuffle (neighbours differ)."""
    from matplotlib import colormaps

    if k <= 10:
        return colormaps["tab10"](np.arange(k))
    if k <= 20:
        return colormaps["tab20"](np.arange(k))
    order = np.random.default_rng(0).permutation(k)
    return colormaps["turbo"](np.linspace(0.05, 0.95, k))[order]


def hex_color(rgba) -> str:
    return "#" + "".join(f"{int(round(v * 255)):02x}" for v in rgba[:3])


def _uri(fig, dpi: int = 100) -> str:
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buf, format="svg", dpi=dpi, metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(w: float, h: float, layout: str | None = None):
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_RC):
        return Figure(figsize=(w, h), dpi=100, layout=layout)


def map_figure(xy: np.ndarray, cluster: np.ndarray, k: int, share: list[float]) -> tuple[str, np.ndarray]:
    """The 2-D map coloured by cluster, each cluster's number at its median; returns (SVG data URI, each point's
    position as (x, y) fractions of the image from its top-left corner, for the page's hover)."""
    import matplotlib

    with matplotlib.rc_context(_RC):
        fig = _figure(9.0, 7.0)
        ax = fig.add_axes((0.07, 0.08, 0.91, 0.88))  # fixed: the positions below must be the drawn ones
        size = float(np.clip(20000 / max(len(xy), 1), 2.0, 14.0))
        ax.scatter(xy[:, 0], xy[:, 1], c=colors(k)[cluster], s=size, linewidths=0, alpha=0.75, rasterized=True)
        for c in range(k):
            mine = xy[cluster == c]
            if len(mine):
                mx, my = np.median(mine, axis=0)
                ax.text(mx, my, str(c), fontsize=8, weight="bold", ha="center", va="center",
                        bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))  # fmt: skip
        pad = (xy.max(0) - xy.min(0)) * 0.03 + 1e-6
        ax.set_xlim(xy[:, 0].min() - pad[0], xy[:, 0].max() + pad[0])
        ax.set_ylim(xy[:, 1].min() - pad[1], xy[:, 1].max() + pad[1])
        ax.set_xlabel(f"principal component 1 ({share[0]:.0%} of the variance)")
        ax.set_ylabel(f"principal component 2 ({share[1]:.0%})")
        pix = ax.transData.transform(xy)
        frac = np.stack([pix[:, 0] / fig.bbox.width, 1.0 - pix[:, 1] / fig.bbox.height], 1)
        return _uri(fig, dpi=110), frac


def heatmap_figure(table: np.ndarray, order: np.ndarray, label_names: list[str]) -> str:
    """Cluster x label heat-map: each cell the share of the cluster's images with that label (counts written in
    when the grid is small), clusters in `order` (grouped by their majority label)."""
    import matplotlib

    k, L = len(order), table.shape[1]
    share = table[order] / np.maximum(table[order].sum(1, keepdims=True), 1)
    with matplotlib.rc_context(_RC):
        fig = _figure(max(5.0, 1.6 + 0.45 * L), min(40.0, max(3.0, 1.4 + 0.26 * k)), layout="constrained")
        ax = fig.add_subplot()
        im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(L), label_names, rotation=45, ha="right")
        ax.set_yticks(range(k), [f"cluster {c}" for c in order], fontsize=7 if k > 30 else 9)
        ax.set_xlabel("label")
        if k * L <= 600:
            for r in range(k):
                for c in range(L):
                    n = table[order[r], c]
                    if n:
                        ax.text(c, r, f"{n:,}", ha="center", va="center", fontsize=7,
                                color="white" if share[r, c] > 0.55 else "#222")  # fmt: skip
        fig.colorbar(im, ax=ax, fraction=0.04, pad=0.01, label="share of the cluster")
        return _uri(fig)


def kscan_figure(rows: list[dict], best: int, criterion: str) -> str:
    """The k scan: the criterion (and the k-means objective) against k, the chosen k marked."""
    import matplotlib

    ks = [r["k"] for r in rows]
    with matplotlib.rc_context(_RC):
        fig = _figure(7.0, 3.2)
        ax = fig.add_axes((0.09, 0.16, 0.8, 0.78))
        ax.plot(ks, [r["silhouette"] for r in rows], "o-", color="#4a7bd0", label=criterion)
        ax.axvline(best, color="#d04a4a", ls="--", lw=1)
        ax.set_xlabel("k")
        ax.set_ylabel("silhouette (higher is better)")
        ax2 = ax.twinx()
        ax2.plot(ks, [r["objective"] for r in rows], "s:", color="#888", ms=3, label="k-means objective")
        ax2.set_ylabel("k-means objective (sample)", color="#888")
        ax.set_title(f"k = {best} chosen", fontsize=9, loc="left")
        return _uri(fig)


def lines_figure(panels: list[dict], bands: list[tuple[float, float, str]], width: float = 9.0) -> str:
    """Small multiples sharing the x axis: each panel {"title", "series": [(label, xs, ys, style[, colour])], "hline"?};
    bands: (start, end, name) shaded spans (training stages)."""
    import matplotlib

    cols = 3 if len(panels) > 4 else max(1, min(2, len(panels)))
    rows = -(-len(panels) // cols)
    with matplotlib.rc_context(_RC):
        fig = _figure(width, 2.4 * rows, layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
        for ax, p in zip(axes.ravel(), panels):
            for i, (start, end, _) in enumerate(bands):
                ax.axvspan(start, end, color=("#f2f2f2", "#e6eef9", "#f9efe6")[i % 3], lw=0)
            for label, xs, ys, style, *colour in p["series"]:
                ax.plot(xs, ys, style, ms=3, lw=1.2, label=label, color=colour[0] if colour else None)
            if p.get("hline") is not None:
                ax.axhline(p["hline"][1], color="#999", ls="--", lw=1, label=p["hline"][0])
            ax.set_title(p["title"], fontsize=9, loc="left")
            if len(p["series"]) > 1 or p.get("hline") is not None:
                ax.legend(fontsize=7, frameon=False)
        for ax in axes.ravel()[len(panels) :]:
            ax.set_visible(False)
        for ax in axes[-1]:
            ax.set_xlabel("epoch (all stages in order)")
        return _uri(fig)
