"""Editing methods.  Each is an :class:`Editor` registered with its hyperparameter dataclass.

A built-in method is one module of this package whose editor class is decorated with
:func:`editlab.registry.register_method`, plus its ``conf/method/<name>.yaml`` (the per-model
table of its defaults).  Importing this package imports every module in it, so nothing keeps a
list of methods by hand.

Methods outside editlab register the same way from their own package, found through the
``editlab.methods`` entry-point group, e.g. in its ``pyproject.toml``::

    [project.entry-points."editlab.methods"]
    mymethod = "mypackage.mymethod"

Each entry point names a module (or an object in it); loading it runs its ``register_method``.
Its yaml goes on Hydra's search path (``hydra.searchpath=[pkg://mypackage/conf]``).
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from importlib.metadata import entry_points

from editlab.config import resolve_hparams
from editlab.methods.base import Editor, EditorContext
from editlab.registry import METHODS


def _import_every_method() -> None:
    """Import the modules of this package and the entry points: each registers its method."""
    for module in pkgutil.iter_modules(__path__, f"{__name__}."):
        importlib.import_module(module.name)
    for entry in entry_points(group="editlab.methods"):
        entry.load()


_import_every_method()


def build_editor(method_cfg, model_name: str, ctx: EditorContext) -> Editor:
    name = method_cfg.name
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    cls = METHODS[name]
    if method_cfg.get("norm_anchor") and not _has_field(cls, "norm_anchor"):
        supported = sorted(n for n, c in METHODS.items() if _has_field(c, "norm_anchor"))
        raise ValueError(f"method.norm_anchor=true: {name} has no v*/z search to anchor; norm-anchor scaling "
                         f"applies to {', '.join(supported)}")
    return cls(resolve_hparams(method_cfg, model_name, cls.Hparams, ctx.n_layers), ctx)


def _has_field(cls, key: str) -> bool:
    return key in {f.name for f in dataclasses.fields(cls.Hparams)}


__all__ = ["METHODS", "Editor", "EditorContext", "build_editor"]
