"""The paper's edit orders: ``sample=k`` is order k filtered to the records that exist."""
from __future__ import annotations

import json
from pathlib import Path

from editlab.data.requests import EditRequest
from editlab.errors import DataError


def load_order(file: str | Path, index: int) -> list[int]:
    """Order ``index`` (1-based, as the paper numbers its samples) of a sample-indices file."""
    file = Path(file)
    try:
        orders = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{file}: not valid JSON: {e}") from e
    key = str(index - 1)
    if not isinstance(orders, dict) or key not in orders:
        n = len(orders) if isinstance(orders, (dict, list)) else 0
        raise DataError(f"{file}: has no order for sample={index} (it holds samples 1..{n})")
    order = orders[key]
    if not isinstance(order, list) or not all(isinstance(i, int) for i in order):
        raise DataError(f"{file}: order {key} must be a list of integer case_ids")
    return order


def select_requests(records: dict[int, EditRequest], order: list[int], n_edits: int) -> list[EditRequest]:
    """First ``n_edits`` of ``order`` present in ``records``, never editing a subject twice."""
    seen: set[str] = set()
    out: list[EditRequest] = []
    for cid in order:
        req = records.get(cid)
        if req is None or req.subject.lower() in seen:
            continue
        seen.add(req.subject.lower())
        out.append(req)
        if len(out) == n_edits:
            break
    if len(out) < n_edits:
        raise DataError(f"only {len(out)} distinct-subject records of this order are available, n_edits={n_edits}")
    return out
