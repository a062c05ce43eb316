"""A training run's own page, report.html in the run directory: every loss term and ACC/NMI against epochs.

Made from what the run already writes: log.jsonl (one record per epoch of every stage, with each loss term
by name; a resumed run's repeated epochs count once, the last record) and metrics.json (the evaluation: the
in-training curve of `--eval-every`, the stage table, the raw-pixel baseline).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from mixem import report_assets
from mixem import report_plots as plots
from mixem.files import atomic_write_text

STAGES = ("epoch", "neighbors", "selflabel")  # log events of the training stages, in the order they run
STAGE_NAMES = {"epoch": "representation", "neighbors": "neighbour consistency", "selflabel": "self-labelling"}
STAGE_COLOURS = {"epoch": "#1f77b4", "neighbors": "#ff7f0e", "selflabel": "#2ca02c"}
NOT_TERMS = {"epoch", "seconds", "images_per_s", "lr"}
REPORT = "report.html"


def read_log(path: Path) -> list[dict]:
    """The JSON objects of a log.jsonl, skipping lines a kill cut short."""
    events = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                events.append(rec)
    return events


def epochs_by_stage(events: list[dict]) -> dict[str, list[dict]]:
    """Per stage, its epoch records in epoch order, the last record of each epoch (a resumed run redoes some)."""
    out = {}
    for stage in STAGES:
        last = {e["epoch"]: e for e in events if e.get("event") == stage and isinstance(e.get("epoch"), int)}
        if last:
            out[stage] = [last[k] for k in sorted(last)]
    return out


def _panels(stages: dict[str, list[dict]]) -> tuple[list[dict], list[tuple[float, float, str]], dict[str, int]]:
    """One panel per loss term (x: epochs of all stages in a row), the stage spans, and each stage's offset."""
    panels, bands, offset, at = {}, [], 0, {}
    for stage, recs in stages.items():
        at[stage] = offset
        bands.append((offset + 0.5, offset + len(recs) + 0.5, STAGE_NAMES[stage]))
        for rec in recs:
            for term, value in rec.items():
                if term in NOT_TERMS or term == "event" or not isinstance(value, (int, float)):
                    continue
                if term in ("time", "elapsed_s"):
                    continue
                p = panels.setdefault(term, {"title": term, "series": {}})
                p["series"].setdefault(stage, ([], []))
                p["series"][stage][0].append(offset + rec["epoch"])
                p["series"][stage][1].append(value)
        offset += len(recs)
    out = []
    for term, p in panels.items():
        series = [(STAGE_NAMES[s], xs, ys, "o-", STAGE_COLOURS[s]) for s, (xs, ys) in p["series"].items()]
        out.append(
            {"title": f"{term} (loss term)" if term != "loss" else "loss (the total minimised)", "series": series}
        )
    return out, bands, at


def _scores_panel(metrics: dict, stages: dict[str, list[dict]], at: dict[str, int]) -> list[dict]:
    """ACC and NMI against epochs: the in-training curve, the representation's headline k-means at its last
    epoch, each refinement stage's argmax at its last epoch; raw-pixel k-means as a line."""
    points = [(c["epoch"], c["acc"], c["nmi"]) for c in metrics.get("curve", [])]
    rep_end = len(stages.get("epoch", []))
    for row in metrics.get("stages", []):
        stage = row.get("stage")
        if stage in stages:
            points.append((at[stage] + len(stages[stage]), row["acc"], row["nmi"]))
        elif str(row.get("init", "")).startswith("lower objective") or row.get("init") == "k-means++":
            continue
        elif rep_end and row.get("features") == "representation":
            points.append((rep_end, row["acc"], row["nmi"]))
    head = metrics.get("headline")
    if not points and head and rep_end:
        points.append((sum(len(r) for r in stages.values()), head["acc"], head["nmi"]))
    if not points:
        return []
    points.sort()
    xs = [p[0] for p in points]
    base = metrics.get("raw_pixel_kmeans") or {}
    return [
        {"title": "ACC against the labels", "series": [("ACC", xs, [p[1] for p in points], "o-")],
         "hline": ("raw-pixel k-means", base["acc"]) if "acc" in base else None},
        {"title": "NMI against the labels", "series": [("NMI", xs, [p[2] for p in points], "o-")],
         "hline": ("raw-pixel k-means", base["nmi"]) if "nmi" in base else None},
    ]  # fmt: skip


def _stage_table(metrics: dict) -> str:
    rows = metrics.get("stages") or []
    if not rows:
        return ""
    cells = "".join(
        f"<tr><td class='b'>{html.escape(str(r.get('features')))}</td><td class='b'>{html.escape(str(r.get('init')))}"
        f"</td><td>{r['acc']:.4f}</td><td>{r['nmi']:.4f}</td><td>{r['ari']:.4f}</td></tr>"
        for r in rows
    )
    return (
        "<h2>What each stage adds</h2><table><tr><th>stage</th><th>classes from</th><th>ACC</th><th>NMI</th>"
        f"<th>ARI</th></tr>{cells}</table>"
    )


def write_train_report(run_dir: str | Path, log_path: str | Path | None = None) -> Path:
    """Write run_dir/report.html from its log (log.jsonl, or where --json-log put it) and metrics.json."""
    run_dir = Path(run_dir)
    events = read_log(Path(log_path) if log_path else run_dir / "log.jsonl")
    metrics = {}
    if (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    stages = epochs_by_stage(events)
    panels, bands, at = _panels(stages)
    scores = _scores_panel(metrics, stages, at)
    start = next((e for e in events if e.get("event") == "start"), {})
    esc = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>mixem-fast run {esc(run_dir.name)}</title>"
        f"<style>{report_assets.CSS}</style></head><body><h1>Training run {esc(str(run_dir))}</h1>"
    ]
    if start:
        m, t = start.get("model", {}), start.get("train", {})
        parts.append(
            f"<div class='meta'>method {esc(str(t.get('method')))}; {esc(str(m.get('backbone')))} "
            f"{m.get('in_channels')}x{m.get('image_size')} px, K = {m.get('components')}, D = {m.get('embed_dim')}; "
            f"{start.get('images', 0):,} images, batch {t.get('batch_size')}, lr {t.get('lr')}, "
            f"{t.get('epochs')} representation epochs; {start.get('parameters', 0):,} parameters</div>"
        )
    head = metrics.get("headline")
    if head:
        parts.append(
            f"<div class='meta'><b>{esc(str(head.get('name')))}</b>: ACC {head['acc']:.4f}, NMI {head['nmi']:.4f}, "
            f"ARI {head['ari']:.4f} ({metrics.get('images', 0):,} images, k = {metrics.get('k')})</div>"
        )
    if scores:
        note = "" if metrics.get("curve") else " (points at the end of each stage; `--eval-every N` adds points)"
        parts.append(f"<h2>ACC and NMI against epochs{note}</h2>")
        parts.append(f"<img class='fig' alt='scores' src='{plots.lines_figure(scores, bands, width=9.0)}'>")
    parts.append(_stage_table(metrics))
    if panels:
        parts.append("<h2>Loss terms against epochs</h2><p class='meta'>The mean of each term over the epoch, as "
                     "log.jsonl records it; shaded: the stages.</p>")  # fmt: skip
        parts.append(f"<img class='fig' alt='loss terms' src='{plots.lines_figure(panels, bands, width=11.0)}'>")
    else:
        parts.append("<p class='meta'>No epoch records in log.jsonl.</p>")
    parts.append("</body></html>\n")
    return atomic_write_text(run_dir / REPORT, "\n".join(parts))
