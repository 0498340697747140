"""Editing methods.  Each is an :class:`Editor` with a hyperparameter dataclass.

``METHODS`` maps a config name to its editor class; a method's yaml under ``conf/method/``
carries the per-model table of its defaults.
"""
from __future__ import annotations

from pathlib import Path

from editlab.config import resolve_hparams
from editlab.methods.base import Delta, EditFailed, Editor, EditorContext
from editlab.methods.alphaedit import AlphaEditEditor
from editlab.methods.emmet import EMMETEditor
from editlab.methods.encore import ENCOREEditor
from editlab.methods.ft import FTEditor
from editlab.methods.grace import GRACEEditor
from editlab.methods.locft_bf import LocFTBFEditor
from editlab.methods.memit import MEMITEditor
from editlab.methods.mend import MENDEditor
from editlab.methods.rome import ROMEEditor

METHODS: dict[str, type[Editor]] = {
    cls.name: cls for cls in (FTEditor, ROMEEditor, MEMITEditor, EMMETEditor, AlphaEditEditor, ENCOREEditor, MENDEditor,
                              GRACEEditor, LocFTBFEditor)
}


def build_editor(method_cfg, model_name: str, ctx: EditorContext) -> Editor:
    name = method_cfg.name
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    cls = METHODS[name]
    return cls(resolve_hparams(method_cfg, model_name, cls.Hparams, ctx.n_layers), ctx)


__all__ = ["METHODS", "Delta", "EditFailed", "Editor", "EditorContext", "Path", "build_editor"]
