"""``editlab compare run_dir=DIR [run_dir=DIR ...] [at_edit=N] [window=50] [out=FILE.md]``

One row per run, every number read at the same edit ``N`` (default: the smallest last edit of the
runs, so that all rows are comparable): the windowed new-edit scores, the forgotten fraction of
earlier edits, the downstream F1 change from the unedited model, the weight distance, and the
mean wall time per edit.  Runs are usually the jobs of one multirun, e.g.

    editlab -m method=ft,rome,memit sample.n_edits=100 tracker=none
    editlab compare run_dir=multirun/<time> at_edit=100

A value that the run's ``eval`` schedule never measured at or before ``N`` is left empty, never
guessed.  Methods that leave the weights alone report their adaptor instead of a distance: GRACE the
size of its codebook, WISE its side memory's relative distance from the weights it copies.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from editlab.args import parse_args
from editlab.results import FORGET_FRACTION, RunResult, downstream_changes, find_runs, load_run, value_at

COLUMNS = (  # (key, header, format)
    ("es", "ES", "{:.2f}"),
    ("ps", "PS", "{:.2f}"),
    ("ns", "NS", "{:.2f}"),
    ("forgetting_pct", "Forgotten (%)", "{:.1f}"),
    ("downstream_change", "Downstream ΔF1 (pts)", "{:+.1f}"),
    ("distance", "Distance ‖ΔW‖/‖W₀‖", "{:.4f}"),
    ("time_per_edit", "Time/edit (s)", "{:.1f}"),
    ("failed", "Failed edits", "{:d}"),
)
# Methods without weight deltas: the series that stands for their distance, and how it is shown.
ADAPTORS = (
    ("method/codebook_size", "codebook {:.0f}"),  # GRACE: the codebook it grew
    ("method/side_distance", "side {:.4f}"),  # WISE: ‖W′ − W‖/‖W‖ of its side memory
)
USAGE = "editlab compare run_dir=DIR [run_dir=DIR ...] [at_edit=N] [window=50] [out=FILE.md]"


def last_edit(run: RunResult) -> int:
    edits = run.series.get("edit/es", next(iter(run.series.values()), (np.zeros(0, int),)))[0]
    return int(edits[-1]) if len(edits) else 0


def compare_row(run: RunResult, at_edit: int, window: int = 50) -> dict[str, Any]:
    """The comparison numbers of one run at edit ``at_edit`` (see the module docstring)."""
    row: dict[str, Any] = {"run": run.label, "method": run.method, "at_edit": at_edit}
    for score in ("es", "ps", "ns"):
        row[score] = value_at(run, f"window{window}/{score}", at_edit)
    frac = value_at(run, FORGET_FRACTION, at_edit)
    row["forgetting_pct"] = None if frac is None else frac * 100
    changes = downstream_changes(run, at_edit)
    row["downstream_change"] = float(np.mean(changes) * 100) if changes else None
    row["distance"] = value_at(run, "distance/relative_mean", at_edit)
    if row["distance"] is None:
        for key, fmt in ADAPTORS:
            if key in run.series and (value := value_at(run, key, at_edit)) is not None:
                row["adaptor"] = fmt.format(value)
                break
    if "time/edit_s" in run.series:
        edits, secs = run.series["time/edit_s"]
        keep = (edits >= 1) & (edits <= at_edit)
        row["time_per_edit"] = float(secs[keep].mean()) if keep.any() else None
    if "edit/failed" in run.series:
        edits, failed = run.series["edit/failed"]
        row["failed"] = int(failed[(edits >= 1) & (edits <= at_edit)].sum())
    return row


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    if key == "distance" and row.get("distance") is None and row.get("adaptor") is not None:
        return row["adaptor"]
    value = row.get(key)
    return "" if value is None else fmt.format(value)


def markdown(rows: list[dict[str, Any]], window: int) -> str:
    at = rows[0]["at_edit"] if rows else 0
    heads = [h if k not in ("es", "ps", "ns") else f"{h} (w{window})" for k, h, _ in COLUMNS]
    lines = [f"At edit {at}; ES/PS/NS are means over the last {window} edits, each scored right after it was made.",
             "", "| run | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['run']} | " + " | ".join(_cell(r, k, f) for k, _, f in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv, {"run_dir": [], "at_edit": None, "window": 50, "out": None}, required=("run_dir",),
                          usage=USAGE)
        runs = [load_run(p) for p in find_runs(args["run_dir"])]
        window = args["window"]
        at_edit = int(args["at_edit"]) if args["at_edit"] is not None else min(last_edit(r) for r in runs)
    except (FileNotFoundError, ValueError) as e:
        print(f"editlab compare: {e}", file=sys.stderr)
        return 2
    short = [r.label for r in runs if last_edit(r) < at_edit]
    if short:
        print(f"editlab compare: warning: {short} end before edit {at_edit}; their last values are shown",
              file=sys.stderr)
    text = markdown([compare_row(r, at_edit, window) for r in runs], window)
    if args["out"]:
        Path(args["out"]).write_text(text)
    print(text, end="")
    return 0
