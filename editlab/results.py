"""A finished (or running) run dir read back: its metric curves, summary, config, and the
paper's Table 3 row.  Both the local plots and the end-of-run summary use this, so the numbers
in ``report.html`` and in W&B's ``paper/*`` summary keys are the same numbers.
"""
from __future__ import annotations

import gzip
import json
import logging
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# What editlab.evaluate writes: the collapse onset (edit count after the collapsing step), the
# suspected disabling edits, and (eval.confirm_disabling) each suspect re-applied alone.
COLLAPSE_ONSET = "collapse/onset"
DISABLING = "collapse/disabling"
CONFIRMED = "collapse/confirmed"
FORGET_FRACTION = "forget/frac"
BREAKDOWN_INVALID = 0.5  # most answers are no label word: the model has stopped answering


@dataclass
class RunResult:
    """One run dir: ``series[key] = (edits, values)`` sorted by edit, last value per edit wins."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    series: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def _cfg(self, *keys: str, default: Any = "?") -> Any:
        node: Any = self.config
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return default
            node = node[k]
        return node

    @property
    def method(self) -> str:
        return str(self._cfg("method", "name"))

    @property
    def model(self) -> str:
        return str(self._cfg("model", "name"))

    @property
    def sample(self) -> str:
        return str(self._cfg("sample", "index"))

    @property
    def label(self) -> str:
        return f"{self.method} · {self.model} · sample {self.sample}"

    def keys(self, prefix: str) -> list[str]:
        return [k for k in self.series if k.startswith(prefix)]

    @property
    def collapse_edit(self) -> int | None:
        c = self.summary.get(COLLAPSE_ONSET)
        return int(c) if isinstance(c, (int, float)) and c >= 0 else None

    @cached_property  # every panel of every figure asks
    def breakdown(self) -> tuple[int, int] | None:
        """The downstream rounds between which the model stopped giving label words as answers
        (:func:`breakdown`), read from the mean over tasks of ``invalid``."""
        keys = [k for t in downstream_tasks(self) if (k := f"downstream/{t}/invalid") in self.series]
        if not keys:
            return None
        rounds: dict[int, list[float]] = {}
        for k in keys:
            for e, v in zip(*self.series[k]):
                rounds.setdefault(int(e), []).append(float(v))
        return breakdown([(e, sum(v) / len(v)) for e, v in sorted(rounds.items())])

    @property
    def first_breakdown(self) -> tuple[int, int] | None:
        """The breakdown where it marks the collapse: no onset comes before or within its rounds."""
        broke, onset = self.breakdown, self.collapse_edit
        return broke if broke is not None and (onset is None or onset > broke[1]) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


METRICS_FILES = ("metrics.jsonl", "metrics.jsonl.gz")  # a long run's committed copy is gzipped


def metrics_file(run_dir: Path) -> Path | None:
    return next((run_dir / n for n in METRICS_FILES if (run_dir / n).exists()), None)


def load_run(run_dir: str | Path) -> RunResult:
    run_dir = Path(run_dir)
    metrics = metrics_file(run_dir)
    if metrics is None:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is this an editlab run dir?)")
    text = gzip.decompress(metrics.read_bytes()).decode() if metrics.suffix == ".gz" else metrics.read_text()
    lines = text.splitlines()
    points: dict[str, dict[int, float]] = {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):  # a job killed mid-write leaves a torn last line
                log.warning("%s:%d: ignoring a truncated last record", metrics, i)
                continue
            raise ValueError(f"{metrics}:{i}: not valid JSON ({e})") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("edit"), int):
            raise ValueError(f"{metrics}:{i}: record has no integer 'edit' field")
        for k, v in rec.items():
            if k != "edit" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                points.setdefault(k, {})[rec["edit"]] = float(v)
    series = {}
    for k, by_edit in points.items():
        edits = np.array(sorted(by_edit), dtype=np.int64)
        series[k] = (edits, np.array([by_edit[e] for e in edits]))
    return RunResult(run_dir, _read_json(run_dir / "config.json"), _read_json(run_dir / "summary.json"), series)


def breakdown(invalid: list[tuple[int, float]], threshold: float = BREAKDOWN_INVALID) -> tuple[int, int] | None:
    """A collapse without a jump: ``(after, at)``, where ``at`` is the first downstream round at
    which the fraction of generated few-shot answers that are no label word exceeds ``threshold``
    and ``after`` the round before, so the model broke in edits after+1..at.

    Edits that pile up smoothly can still leave a model emitting word salad; the onset's distance
    jump (``evaluate/collapse.py``) never fires then.  ``invalid`` holds one point per round, the
    first at edit 0.  None when the unedited model itself does not answer (a random tiny model)
    or no round lost its answers."""
    points = sorted(invalid)
    if not points or points[0][0] != 0 or points[0][1] > threshold:
        return None
    for (prev, _), (edit, v) in zip(points, points[1:]):
        if v > threshold:
            return prev, edit
    return None


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run dirs named directly, by glob, or found below a sweep dir (anything holding metrics.jsonl)."""
    found: list[Path] = []
    for p in paths:
        matches = sorted(Path().glob(str(p))) if any(c in str(p) for c in "*?[") else [Path(p)]
        if not matches:
            raise FileNotFoundError(f"run_dir={p}: nothing matches")
        for m in matches:
            if metrics_file(m) is not None:
                found.append(m)
            elif m.is_dir():
                below = sorted({q.parent for n in METRICS_FILES for q in m.rglob(n)})
                if not below:
                    raise FileNotFoundError(f"run_dir={m}: no metrics.jsonl in it or below it")
                found.extend(below)
            else:
                raise FileNotFoundError(f"run_dir={m}: no such directory")
    return list(dict.fromkeys(found))


def value_at(run: RunResult, key: str, edit: int) -> float | None:
    """The newest value of ``key`` at or before ``edit`` (None if there is none)."""
    if key not in run.series:
        return None
    edits, vals = run.series[key]
    idx = np.searchsorted(edits, edit, side="right") - 1
    return float(vals[idx]) if idx >= 0 else None


def downstream_tasks(run: RunResult) -> list[str]:
    return sorted({k.split("/")[1] for k in run.keys("downstream/") if k.count("/") >= 2})


def downstream_changes(run: RunResult, edit: int) -> list[float]:
    """Per task, F1 at ``edit`` minus F1 of the unedited model (generation F1, else likelihood F1)."""
    changes = []
    for task in downstream_tasks(run):
        key = next((k for k in (f"downstream/{task}/f1_gen", f"downstream/{task}/f1_lik") if k in run.series), None)
        if key is None:
            continue
        base, now = value_at(run, key, 0), value_at(run, key, edit)
        if base is not None and now is not None:
            changes.append(now - base)
    return changes


def table3(run: RunResult) -> dict[str, Any]:
    """The paper's Table 3 for one run, measured up to the collapse point (or the run's end).

    The collapse point is the detected onset.  A run that broke down (its answers stopped being
    label words between two downstream rounds, ``breakdown_between``) with no onset up to the
    later of those rounds is measured up to the earlier one, the last at which it still answered.

    efficacy_until_collapse: mean efficacy of each edit when it was made, over edits before
        collapse; edits_before_collapse: edits applied before the collapse edit (all, if none);
    forgetting_pct: fraction of earlier successful edits forgotten at the last forgetting point
        before collapse; downstream_loss: mean over tasks of the drop in F1 (points) from the
        unedited model to the last point before collapse (generation F1, else likelihood F1);
    single_disabling_edit: whether a single edit, applied alone, disables the model ("yes"/"no"
        when confirmed by re-applying it, "suspected (k)" when only its distance jump flags it).
    """
    last = int(max((e[-1] for e, _ in run.series.values() if len(e)), default=0))
    n_edits = int(run.summary.get("n_edits", last))
    collapse, broke, first = run.collapse_edit, run.breakdown, run.first_breakdown
    if first is not None:
        end = first[0]  # the model had stopped answering before any onset: the last round it answered
    elif collapse is not None:
        end = collapse - 1  # edits before the collapsing one (batch size 1)
    else:
        end = n_edits
    row: dict[str, Any] = {"collapsed": collapse is not None or broke is not None,
                           "edits_before_collapse": max(end, 0), "n_edits": n_edits,
                           "breakdown_between": list(broke) if broke is not None else None}

    es = run.series.get("edit/es", run.series.get("edit/rewrite_acc"))  # zsRE: rewrite token accuracy
    if es is not None:
        keep = (es[0] >= 1) & (es[0] <= max(end, 1))
        row["efficacy_until_collapse"] = float(es[1][keep].mean() * 100) if keep.any() else None
    if FORGET_FRACTION in run.series:
        f = value_at(run, FORGET_FRACTION, max(end, 0))
        row["forgetting_pct"] = None if f is None else f * 100
    drops = [-c for c in downstream_changes(run, max(end, 0))]
    if drops:
        row["downstream_loss"] = float(np.mean(drops) * 100)
    confirmed, suspects = run.summary.get(CONFIRMED), run.summary.get(DISABLING)
    if isinstance(confirmed, list):
        row["single_disabling_edit"] = "yes" if any(c.get("disables") for c in confirmed) else "no"
    elif isinstance(suspects, list):
        row["single_disabling_edit"] = f"suspected ({len(suspects)})" if suspects else "no"
    return row


# -- the paper's panels, shared by the local plots and the W&B report -------------------------
SCORES = (("es", "Efficacy"), ("ps", "Paraphrase"), ("ns", "Neighborhood"))
ZSRE_SCORES = (("rewrite_acc", "Rewrite accuracy"), ("rephrase_acc", "Rephrase accuracy"),
               ("loc_vs_unedited", "Locality vs unedited model"), ("loc_vs_nq", "Locality vs NQ answer"))
FORGET_PANELS = (  # (metric, title, y label); bookkeeping counts (n_earlier, eligible) are not drawn
    ("forget/frac", "Forgotten fraction of earlier edits", "fraction forgotten"),
    ("forget/count", "Forgotten earlier edits (count)", "edits forgotten"),
    ("forget/retention", "Retention of all earlier edits", "mean efficacy of earlier edits"),
    ("forget/para_frac", "Forgotten fraction (paraphrases)", "fraction forgotten"),
    ("forget/para_retention", "Retention of paraphrases", "mean paraphrase success"),
    ("forget/rewrite_acc", "Token accuracy of earlier edits (zsRE)", "mean token accuracy"),
    ("forget/rephrase_acc", "Token accuracy of earlier rephrasings (zsRE)", "mean token accuracy"),
)
TASK_TITLES = {"sst2": "SST-2", "mrpc": "MRPC", "rte": "RTE (NLI)", "nli": "NLI", "cola": "CoLA"}
TABLE3_COLUMNS = (  # (key, header) in the paper's order
    ("efficacy_until_collapse", "Efficacy until collapse (%)"),
    ("edits_before_collapse", "Edits before collapse"),
    ("forgetting_pct", "Forgetting (%)"),
    ("downstream_loss", "Downstream loss (F1 pts)"),
    ("single_disabling_edit", "Single disabling edit"),
)


def rewrite_panels(windows=(5, 50), magnitude: bool = False) -> list[tuple[str, str]]:
    """(title, metric) for efficacy/paraphrase/neighborhood per window, the paper's Fig. 1 rows."""
    suffix = "_mag" if magnitude else ""
    word = " magnitude" if magnitude else ""
    return [(f"{name}{word} (window {w})", f"window{w}/{key}{suffix}") for w in windows for key, name in SCORES]


def zsre_panels(windows=(5, 50)) -> list[tuple[str, str]]:
    """(title, metric) for the zsRE token accuracies per window."""
    return [(f"{name} (window {w})", f"window{w}/{key}") for w in windows for key, name in ZSRE_SCORES]


def task_title(task: str) -> str:
    return TASK_TITLES.get(task, task)

