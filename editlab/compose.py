"""What every entry point (the cli, train-mend, the benches, the tests) needs to compose a run config.

:func:`register_configs` stores the schemas in Hydra's ConfigStore, every registered method's
included.  It lives here rather than in :mod:`editlab.config` because it must import
:mod:`editlab.methods` to fill the registry, and the methods read the config layer: config
importing them back would be a cycle.
"""
from __future__ import annotations

import re

from editlab.config import store_schemas


def register_configs() -> None:
    """Register the schema of every config group and of every method in ``editlab.registry``."""
    from editlab.methods import METHODS  # imports every method module; deferred: `editlab plot` needs no torch

    store_schemas({name: cls.Hparams for name, cls in METHODS.items()})


_NUMERIC_GROUP = re.compile(r"^(\+{0,2}sample)=(\d+(?:,\d+)*)$")


def normalize_overrides(args: list[str]) -> list[str]:
    """Quote numeric choices of the ``sample`` group (``sample=3`` -> ``sample='3'``).

    Hydra parses ``3`` as an int, and config-group choices must be strings; the paper's samples
    are numbered, so ``sample=3`` (and multirun ``sample=1,2,3``) must work as typed.
    """
    out = []
    for a in args:
        m = _NUMERIC_GROUP.match(a)
        out.append(f"{m.group(1)}=" + ",".join(f"'{v}'" for v in m.group(2).split(",")) if m else a)
    return out
