"""MEND's training records, kept disjoint from every record a ``sample`` order evaluates."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from editlab.data import EditRequest, load_counterfact, load_order, select_requests
from editlab.errors import DataError

log = logging.getLogger(__name__)


class OverlapError(ValueError):
    """A training record that is also evaluated by a sample order."""


@dataclass(frozen=True)
class Excluded:
    case_ids: frozenset[int]
    subjects: frozenset[str]  # lower-cased: a record about an evaluated subject would leak too
    source: str  # what was excluded, for the editor's config


def evaluated_records(counterfact: Path, orders_file: Path, n_edits: Optional[int]) -> Excluded:
    """Every record the stream can edit under any sample order in ``orders_file``.

    ``n_edits`` given: each order's first ``n_edits`` as the stream selects them.  ``None`` (or
    an order too short for ``n_edits``): every record of the file that the order lists, a
    superset of what any ``sample.n_edits`` selects.
    """
    records = load_counterfact(counterfact)
    try:
        n_orders = len(json.loads(orders_file.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{orders_file}: cannot read the sample orders: {e}") from e
    chosen: dict[int, EditRequest] = {}
    for k in range(1, n_orders + 1):
        order = load_order(orders_file, k)
        try:
            sel = select_requests(records, order, n_edits) if n_edits is not None else None
        except DataError:
            sel = None
        for r in sel if sel is not None else (records[c] for c in order if c in records):
            chosen[r.case_id] = r
    which = "all" if n_edits is None else f"first {n_edits}"
    what = f"{which} of {n_orders} orders in {orders_file.name} over {counterfact.name}"
    return Excluded(frozenset(chosen), frozenset(r.subject.lower() for r in chosen.values()), what)


def overlapping(records: Sequence[EditRequest], excluded: Excluded) -> list[EditRequest]:
    return [r for r in records if r.case_id in excluded.case_ids or r.subject.lower() in excluded.subjects]


def check_disjoint(records: Sequence[EditRequest], excluded: Excluded, file: Path) -> None:
    """Refuse to train on any record a sample order evaluates."""
    bad = overlapping(records, excluded)
    if bad:
        ids = ", ".join(str(r.case_id) for r in bad[:10])
        raise OverlapError(f"{file}: {len(bad)} training records overlap the evaluated records "
                           f"({excluded.source}), e.g. case_ids {ids}")


def training_records(file: Path, excluded: Excluded) -> list[EditRequest]:
    """Records of ``file`` usable for MEND: not evaluated, with a paraphrase and a neighbour prompt."""
    records = list(load_counterfact(file).values())
    bad = {r.case_id for r in overlapping(records, excluded)}
    kept = [r for r in records if r.case_id not in bad and r.paraphrase_prompts and r.neighborhood_prompts]
    log.info("%s: %d records, %d dropped as evaluated (%s), %d kept", file, len(records), len(bad),
             excluded.source, len(kept))
    check_disjoint(kept, excluded, file)
    if not kept:
        raise DataError(f"{file}: no training records left after excluding evaluated ones")
    return kept
