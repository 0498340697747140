"""The end of a run: its Table 3 row into the tracker's summary and its figures on disk.

Apart from :mod:`editlab.results` (which reads run dirs) and :mod:`editlab.plots` (which draws
them from those results), so that neither imports the other back.
"""
from __future__ import annotations

import logging
from pathlib import Path

from editlab.results import load_run, table3

log = logging.getLogger(__name__)


def publish_results(run_dir: str | Path, tracker, draw: bool = True) -> None:
    """Table 3 into the tracker's summary (``paper/*``) and, if ``draw``, the figures into
    ``<run_dir>/plots``.  Never raises: a plotting bug must not lose a finished run."""
    try:
        row = table3(load_run(run_dir))
        tracker.summary({f"paper/{k}": v for k, v in row.items()})
    except Exception:  # noqa: BLE001 - reported, and the run's own files are already written
        log.exception("could not summarise %s for Table 3; metrics.jsonl is intact", run_dir)
    if not draw:
        return
    try:
        from editlab.plots import plot_runs  # matplotlib only for runs that draw

        plot_runs([run_dir], Path(run_dir) / "plots")
    except Exception:  # noqa: BLE001
        log.exception("could not draw the plots of %s; metrics are intact (retry: editlab plot run_dir=...)", run_dir)
