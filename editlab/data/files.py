"""Reading a data file that holds a JSON list of records, with errors naming the file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from editlab.errors import DataError


def read_records(path: Path, missing: str, nonempty: bool = True) -> list[Any]:
    """The records of ``path``; ``missing`` is the error when the file does not exist."""
    if not path.exists():
        raise FileNotFoundError(missing)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(records, list) or (nonempty and not records):
        raise DataError(f"{path}: expected a {'non-empty JSON list' if nonempty else 'list'} of records")
    return records
