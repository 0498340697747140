"""Collapse detection from the logged curves (docs/architecture.md, "Metrics").

Inputs are histories of ``(edit, value)`` points: the distance of the edited weights from the base
(``distance/mean``, logged each distance step), the new-edit efficacy of each step, and the mean
downstream F1 of each downstream round (its first point is the unedited model).

* A *jump* is the change of distance over one logged step.  A step is a **disabling edit** when
  its jump exceeds ``factor`` times the median of all earlier jumps (at least ``min_history`` of
  them): one edit that moves the weights orders of magnitude more than edits usually do.
* **Collapse onset** is the first step whose jump exceeds ``onset_factor`` times the running
  median *and* after which new-edit efficacy falls by ``es_drop`` (mean over ``window`` steps
  after vs before) *and* the next downstream round's F1 is ``f1_drop`` below the last one before
  (this last condition is skipped when no downstream round brackets the step).

A collapse without a jump, a *breakdown*, is read from the logged downstream rounds by
``editlab.results.breakdown``.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

Curve = Sequence[tuple[int, float]]


@dataclass
class Jump:
    edit: int  # edit count after the step
    prev: int  # edit count before it: the step applied edits prev+1..edit
    jump: float
    median: float  # median of the earlier jumps
    ratio: float


def jumps(distance: Curve, factor: float, min_history: int = 3) -> list[Jump]:
    """Steps whose distance jump exceeds ``factor`` times the running median of earlier jumps."""
    flagged, seen = [], []  # seen: the earlier |jumps|, kept sorted
    prev_edit, prev_d = 0, 0.0
    for edit, d in distance:
        if edit == 0:
            prev_d = d
            continue
        j = abs(d - prev_d)
        if len(seen) >= min_history:
            k = len(seen)
            med = seen[k // 2] if k % 2 else (seen[k // 2 - 1] + seen[k // 2]) / 2
            if med > 0 and j > factor * med:
                flagged.append(Jump(edit, prev_edit, j, med, j / med))
        bisect.insort(seen, j)
        prev_edit, prev_d = edit, d
    return flagged


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def collapse_onset(distance: Curve, efficacy: Curve, downstream: Curve, onset_factor: float = 10.0,
                   window: int = 10, es_drop: float = 0.3, f1_drop: float = 0.1,
                   min_history: int = 3) -> int | None:
    """Edit count at which catastrophic forgetting begins, or None."""
    for j in jumps(distance, onset_factor, min_history):
        before = _mean([v for e, v in efficacy if e <= j.prev][-window:])
        after = _mean([v for e, v in efficacy if e > j.edit][:window])
        if before is None or after is None or before - after < es_drop:
            continue
        f1_before = [v for e, v in downstream if e <= j.prev]
        f1_after = [v for e, v in downstream if e >= j.edit]
        if f1_before and f1_after and f1_before[-1] - f1_after[0] < f1_drop:
            continue
        return j.edit
    return None
