"""One step's method diagnostics (``Delta.info``) from the diagnostics of its requests.

A method measures per request (ROME's v* loss, MEMIT's z steps, GRACE's distance to the nearest
key) and the stream logs one number per key and step, so the per-request values are averaged.
An outcome code is not a measurement: the mean of GRACE's "new key" (0) and "split" (2) would
read as "expand" (1).  A method declares such a value categorical by giving it as an
:class:`enum.Enum` member; the step then reports how many of its requests had each member.
"""
from __future__ import annotations

from enum import Enum
from numbers import Real
from typing import Any, Mapping, Sequence


def average_info(infos: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Numbers averaged over ``infos``; an Enum-valued key ``k`` becomes ``k/<member>`` counts,
    one per member of its Enum (zeros included, so that every step logs the same keys)."""
    out: dict[str, float] = {}
    for key, first in infos[0].items():
        values = [info[key] for info in infos]
        if isinstance(first, Enum):
            for member in type(first):
                out[f"{key}/{member.name.lower()}"] = float(sum(v == member for v in values))
        elif isinstance(first, Real):
            out[key] = sum(values) / len(values)
        else:
            raise TypeError(f"method diagnostic {key!r} is {first!r}: expected a number or an Enum member")
    return out
