"""The methods a run can name: each editor registers itself, with its hyperparameter schema.

A method is one module with a decorated editor class::

    @register_method("rome", hparams=ROMEHparams)
    class ROMEEditor(KeyValueEditor): ...

plus its ``conf/method/<name>.yaml``.  Nothing else keeps a list of methods: ``editlab.methods``
imports every module of its package, and the entry layer (cli, the benches, the tests) imports
``editlab.methods`` before it reads :data:`METHODS` (``editlab.compose.register_configs`` stores a
Hydra schema for each).  This module imports nothing of editlab, so that any layer may read it
without pulling in the methods.
"""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T", bound=type)

# name -> editor class; its schema is the class's ``Hparams``.
METHODS: dict[str, type] = {}


def register_method(name: str, *, hparams: type) -> Callable[[T], T]:
    """Class decorator: ``cls`` edits under ``method=name`` with hyperparameters ``hparams``.

    It also sets ``cls.name`` and ``cls.Hparams``, which the editor reads (logs, its schema), so
    the name and the schema are written once.  A second class under a taken name is an error:
    two modules claiming one method would otherwise depend on import order.
    """
    def register(cls: T) -> T:
        taken = METHODS.get(name)
        if taken is not None and _where(taken) != _where(cls):  # a reloaded module may register again
            raise ValueError(f"method {name!r} is registered twice: {_where(taken)} and {_where(cls)}")
        cls.name, cls.Hparams = name, hparams
        METHODS[name] = cls
        return cls

    return register


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
