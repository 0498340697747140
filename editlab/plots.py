"""``editlab plot run_dir=... [run_dir=...] [out=...]``: the paper's figures as PNG files.

Reads each run dir's ``metrics.jsonl`` and draws, per model, the windowed efficacy/paraphrase/
neighborhood curves, forgetting, downstream F1 per task, fluency and weight distance per edited matrix
against the number of edits, runs overlaid and coloured by method; then one ``report.html``
showing the figures and the paper's Table 3.  A panel whose metric no run logged is left out.
Uses matplotlib's object API (no pyplot), so nothing global changes in the calling process.
"""
from __future__ import annotations

import html
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from editlab.args import parse_args
from editlab.results import (
    FORGET_PANELS,
    TABLE3_COLUMNS,
    RunResult,
    downstream_tasks,
    find_runs,
    load_run,
    rewrite_panels,
    table3,
    task_title,
    zsre_panels,
)

log = logging.getLogger(__name__)

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22")
SCORE_LIMITS = (-0.03, 1.03)
SE_ALPHA = 0.2
BREAKDOWN_ALPHA = 0.12


@dataclass
class Panel:
    """One subplot: a title and, per run, the metric keys it draws (with a line style each)."""

    title: str
    lines: Callable[[RunResult], list[tuple[str, str]]]  # run -> [(metric key, linestyle)]
    ylabel: str = ""
    ylim: tuple[float, float] | None = None
    style_legend: list[tuple[str, str]] = field(default_factory=list)  # (linestyle, meaning)
    auto_log: bool = False  # log y when the values span > 3 decades (a distance jumping at collapse)


def _fixed(key: str) -> Callable[[RunResult], list[tuple[str, str]]]:
    return lambda run: [(key, "-")] if key in run.series else []


def _short(param: str) -> str:
    """``model.layers.3.mlp.down_proj.weight`` -> ``layers.3.mlp.down_proj``: titles must fit."""
    p = re.sub(r"\.weight$", "", param)
    return re.sub(r"^(model|transformer)\.", "", p)


def figure_specs(runs: list[RunResult]) -> dict[str, tuple[str, list[Panel]]]:
    """Figure name -> (title, panels), the panels for the metrics these runs logged."""
    windows = sorted({int(m.group(1)) for r in runs for k in r.keys("window") if (m := re.match(r"window(\d+)/", k))})
    figs: dict[str, tuple[str, list[Panel]]] = {}
    figs["rewrite"] = ("Rewrite scores vs edits (mean over the last w edits)", [
        Panel(t, _fixed(k), "score", SCORE_LIMITS) for t, k in rewrite_panels(windows)])
    figs["rewrite_magnitude"] = ("Rewrite magnitudes vs edits (probability differences)", [
        Panel(t, _fixed(k), "Δ probability") for t, k in rewrite_panels(windows, magnitude=True)])

    figs["zsre"] = ("zsRE token accuracy vs edits (mean over the last w edits)", [
        Panel(t, _fixed(k), "token accuracy", SCORE_LIMITS) for t, k in zsre_panels(windows)])

    figs["forgetting"] = ("Forgetting of earlier edits vs edits", [
        Panel(title, _fixed(key), ylabel) for key, title, ylabel in FORGET_PANELS])

    tasks = sorted({t for r in runs for t in downstream_tasks(r)})
    styles = [("-", "generation F1 (paper)"), ("--", "label-likelihood F1")]
    figs["downstream"] = ("Downstream few-shot F1 vs edits", [
        *([Panel("mean over tasks F1", _task_lines("mean"), "F1", SCORE_LIMITS, styles)] if len(tasks) > 1 else []),
        *[Panel(f"{task_title(t)} F1", _task_lines(t), "F1", SCORE_LIMITS, styles) for t in tasks]])

    figs["fluency"] = ("Fluency of sampled text vs edits (a collapsed model repeats itself)", [
        Panel("n-gram entropy (2/3·H₂ + 4/3·H₃) / 2", _fixed("gen/fluency"), "bits")])

    params = sorted({k[len("distance/"):] for r in runs for k in r.keys("distance/")
                     if not k.startswith("distance/relative") and k != "distance/mean"})
    several = len(params) > 1  # a mean over one matrix would repeat its panel
    figs["distance"] = ("Distance from the unedited weights vs edits: ‖W − W₀‖_F / numel(W)", [
        *([Panel("mean over edited matrices", _fixed("distance/mean"), "distance", auto_log=True)] if several else []),
        *[Panel(_short(p), _fixed(f"distance/{p}"), "distance", auto_log=True) for p in params]])
    figs["distance_relative"] = ("Relative distance vs edits: ‖W − W₀‖_F / ‖W₀‖_F", [
        *([Panel("mean over edited matrices", _fixed("distance/relative_mean"), "relative distance", auto_log=True)]
          if several else []),
        *[Panel(_short(p), _fixed(f"distance/relative/{p}"), "relative distance", auto_log=True) for p in params]])
    updated = sorted({k[len("method/delta_norm/"):] for r in runs for k in r.keys("method/delta_norm/")})
    figs["delta_norm"] = ("Norm of each step's update vs edits: ‖ΔW‖_F (a disabling edit is a spike)", [
        Panel(_short(p), _fixed(f"method/delta_norm/{p}"), "‖ΔW‖_F", auto_log=True) for p in updated])
    return figs


def _task_lines(task: str) -> Callable[[RunResult], list[tuple[str, str]]]:
    def lines(run: RunResult) -> list[tuple[str, str]]:
        prefix = "downstream/mean_" if task == "mean" else f"downstream/{task}/"
        out = [(f"{prefix}f1_gen", "-"), (f"{prefix}f1_lik", "--")]
        return [(k, s) for k, s in out if k in run.series]
    return lines


def method_colors(runs: list[RunResult]) -> dict[str, str]:
    return {m: COLORS[i % len(COLORS)] for i, m in enumerate(sorted({r.method for r in runs}))}


def draw_figure(title: str, panels: list[Panel], runs: list[RunResult], colors: dict[str, str]) -> Figure | None:
    panels = [p for p in panels if any(p.lines(r) for r in runs)]
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.4 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    drawn: set[str] = set()  # line styles in use, so the legend explains only those
    for ax, panel in zip(axes, panels):
        for run in runs:
            for key, style in panel.lines(run):
                drawn.add(style)
                edits, vals = run.series[key]
                ax.plot(edits, vals, style, color=colors[run.method], lw=1.3 if len(edits) < 500 else 0.7,
                        alpha=0.85, marker="o" if len(edits) == 1 else None, ms=3)  # thin: long noisy curves
                if _draw_se_band(ax, run, key, colors[run.method]):
                    drawn.add("se")
            if run.collapse_edit is not None and panel.lines(run):
                ax.axvline(run.collapse_edit, color=colors[run.method], ls=":", lw=1)
            if run.first_breakdown is not None and panel.lines(run):
                ax.axvspan(*run.first_breakdown, color=colors[run.method], alpha=BREAKDOWN_ALPHA, lw=0)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("number of edits")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(panel.ylabel)
        if panel.ylim:
            ax.set_ylim(*panel.ylim)
        elif panel.auto_log and _spans_decades(ax):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=12)
    handles = [Line2D([], [], color=c, lw=2, label=_method_label(m, runs)) for m, c in colors.items()
               if any(r.method == m for r in runs)]
    styles = {s: meaning for p in panels for s, meaning in p.style_legend if s in drawn}
    handles += [Line2D([], [], color="black", ls=s, lw=1.3, label=meaning) for s, meaning in styles.items()]
    if any(r.collapse_edit is not None for r in runs):
        handles.append(Line2D([], [], color="gray", ls=":", lw=1, label="collapse detected"))
    if any(r.first_breakdown is not None for r in runs):
        handles.append(Patch(color="gray", alpha=2 * BREAKDOWN_ALPHA,
                             label="breakdown: answers stop being label words between these rounds"))
    if "se" in drawn:
        handles.append(Patch(color="gray", alpha=SE_ALPHA, label="± 1 standard error (sampled rounds)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), fontsize=9, frameon=False)
    return fig


def _draw_se_band(ax, run: RunResult, key: str, color: str) -> bool:
    """Shade ± one standard error around ``key`` where the run logged ``<key>_se``: rounds over a
    sample of earlier edits (``eval.forget_sample``) are estimates, and their noise must show."""
    if f"{key}_se" not in run.series:
        return False
    edits, vals = run.series[key]
    se_edits, se = run.series[f"{key}_se"]
    at = dict(zip(se_edits.tolist(), se.tolist()))
    rows = [(e, v, at[e]) for e, v in zip(edits.tolist(), vals.tolist()) if e in at and math.isfinite(at[e])]
    if not rows:
        return False
    x, y, err = (np.array(c) for c in zip(*rows))
    ax.fill_between(x, y - err, y + err, color=color, alpha=SE_ALPHA, lw=0)
    return True


def _spans_decades(ax) -> bool:
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
    return bool(ys) and max(ys) / min(ys) > 1e3


def _method_label(method: str, runs: list[RunResult]) -> str:
    mine = [r for r in runs if r.method == method]
    return f"{method} (sample {mine[0].sample})" if len(mine) == 1 else f"{method} ({len(mine)} runs)"


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> dict[str, Any]:
    """Draw every figure for the runs into ``out`` (one folder per model) and write report.html.

    Returns the index also written to ``out/index.json``: per model, each figure's file and the
    titles of the panels it holds; and the Table 3 rows.
    """
    runs = [load_run(d) for d in find_runs(list(run_dirs))]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"models": {}, "table": []}
    for model in sorted({r.model for r in runs}):
        mine = [r for r in runs if r.model == model]
        colors = method_colors(mine)
        figures = {}
        for name, (title, panels) in figure_specs(mine).items():
            fig = draw_figure(f"{title} — {model}", panels, mine, colors)
            if fig is None:
                continue
            path = out / _safe(model) / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            FigureCanvasAgg(fig).print_png(str(path))
            titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
            figures[name] = {"file": str(path.relative_to(out)), "panels": titles}
        index["models"][model] = figures
    for r in sorted(runs, key=lambda r: (r.model, r.method, r.sample, str(r.path))):
        index["table"].append({"run_dir": str(r.path), "method": r.method, "model": r.model,
                               "sample": r.sample, **table3(r)})
    (out / "index.json").write_text(json.dumps(index, indent=2))
    (out / "report.html").write_text(render_html(index, out))
    return index


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def render_html(index: dict[str, Any], out: Path) -> str:
    """A static page: Table 3 (one row per run) and every figure, one section per model."""
    head = ["method", "model", "sample", "edits", *[h for _, h in TABLE3_COLUMNS]]
    rows = []
    for row in index["table"]:
        cells = [row["method"], row["model"], row["sample"], row["n_edits"]]
        for key, _ in TABLE3_COLUMNS:
            v = row.get(key)
            if key == "edits_before_collapse" and not row["collapsed"]:
                v = f"no collapse in {row['n_edits']}"
            elif key == "edits_before_collapse" and row.get("breakdown_between") and v == row["breakdown_between"][0]:
                v = f"{v} (broke down by {row['breakdown_between'][1]})"
            cells.append(_fmt(v))
        link = os.path.relpath(row["run_dir"], out)
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
                    + f'<td><a href="{html.escape(link)}">{html.escape(link)}</a></td></tr>')
    table = ("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
             + "<th>run dir</th></tr></thead><tbody>" + "\n".join(rows) + "</tbody></table>")
    sections = []
    for model, figures in index["models"].items():
        imgs = "\n".join(f'<figure><img src="{html.escape(f["file"])}" alt="{html.escape(name)}">'
                         f"<figcaption>{html.escape(name)}: {html.escape(', '.join(f['panels']))}</figcaption></figure>"
                         for name, f in figures.items())
        sections.append(f"<h2>{html.escape(model)}</h2>\n{imgs or '<p>no metrics to plot</p>'}")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1500px} table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right} th{background:#f3f3f3}"
             "img{max-width:100%} figure{margin:1.5em 0} figcaption{color:#555;font-size:90%}")
    note = ("Measured up to the detected collapse (or the end of the run). Efficacy: mean success of each "
            "edit when made; forgetting: share of earlier successful edits forgotten; downstream loss: "
            "mean F1 drop over tasks from the unedited model.")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>editlab results</title>"
            f"<style>{style}</style></head><body><h1>editlab results</h1>"
            f"<h2>Table 3: summary per run</h2><p>{html.escape(note)}</p>{table}\n" + "\n".join(sections)
            + "</body></html>\n")


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv, {"run_dir": [], "out": None}, required=("run_dir",),
                          usage="editlab plot run_dir=DIR [run_dir=DIR ...] [out=DIR]")
        out = args["out"] or (Path(args["run_dir"][0]) / "plots" if len(args["run_dir"]) == 1 else Path("plots"))
        index = plot_runs(args["run_dir"], out)
    except (FileNotFoundError, ValueError) as e:
        print(f"editlab plot: {e}", file=sys.stderr)
        return 2
    n = sum(len(f) for f in index["models"].values())
    print(f"editlab plot: {n} figures for {len(index['table'])} runs; open {Path(out) / 'report.html'}")
    return 0
