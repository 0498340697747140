"""MEND in the stream: a network trained by ``editlab train-mend`` turns each step's gradient into
the edit (see :mod:`editlab.mend`).

The edit of a step is computed at the current (already edited) model, as a sequential stream
does.  The editor's path and the sha256 of its weights end up in the run's ``hparams``
(``editor_path``, ``editor_sha256``); a given ``editor_sha256`` must match the file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from editlab.data.requests import EditRequest
from editlab.evaluate.scoring import encode
from editlab.mend.factor import gradient_factors
from editlab.mend.store import load_editor
from editlab.methods.base import Delta, Editor
from editlab.models.loading import LoadedModel
from editlab.registry import register_method


@dataclass
class MENDHparams:
    layers: List[int] = field(default_factory=lambda: [45, 46, 47])
    editor_path: Optional[str] = None  # a directory written by `editlab train-mend`
    editor_sha256: Optional[str] = None  # filled in from the file; given, it must match

    def validate(self) -> None:
        if not self.layers:
            raise ValueError("mend needs at least one layer")


@register_method("mend", hparams=MENDHparams)
class MENDEditor(Editor):
    def prepare(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> None:
        super().prepare(lm, requests)
        hp = self.hp
        if not hp.editor_path:
            raise ValueError("method=mend needs method.editor_path=<directory written by `editlab train-mend`>")
        path = Path(hp.editor_path).expanduser().resolve()
        net, config, digest = load_editor(path, lm.device)  # one network; its inputs are moved to it
        where = path / "config.json"
        if config.get("model_id") != lm.model_id:
            raise ValueError(f"{where}: the editor was trained on model {config.get('model_id')!r}, "
                             f"this run edits {lm.model_id!r}")
        if list(net.spec.layers) != list(hp.layers):
            raise ValueError(f"{where}: the editor edits layers {list(net.spec.layers)}, method.layers is {hp.layers}")
        for layer, shape in zip(net.spec.layers, net.spec.shapes):
            ours = tuple(lm.table.to_math(lm.table.mlp_out_weight(layer)).shape)
            if ours != tuple(shape):
                raise ValueError(f"{where}: layer {layer} was {tuple(shape)} in training, the model's is {ours}")
        if hp.editor_sha256 and hp.editor_sha256 != digest:
            raise ValueError(f"{path / 'editor.safetensors'}: sha256 {digest} != "
                             f"method.editor_sha256 {hp.editor_sha256}")
        hp.editor_path, hp.editor_sha256 = str(path), digest
        self.net = net

    @torch.no_grad()
    def apply(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> Delta:
        if not hasattr(self, "net"):
            raise RuntimeError("mend needs prepare() (which loads the editor) before apply()")
        encs = [encode(lm.tok, r.rewrite_prompt, r.target_new) for r in requests]
        loss, factors = gradient_factors(lm, self.hp.layers, encs)
        params, pieces = {}, {}
        for layer, (a, b) in self.net.updates(factors).items():
            name = lm.table.mlp_out_weight_name(layer)
            w = lm.table.mlp_out_weight(layer)
            # dW = a @ b.T (maths); a, b sit on the network's device, which may not be this layer's
            upd, (a, b) = lm.table.param_delta(a.to(w.device), b.to(w.device))
            params[name] = upd.to(w.dtype)
            pieces[name] = [(a.to(w.dtype), b.to(w.dtype))]
        tokens = float(factors[self.hp.layers[0]][0].shape[0])
        return Delta(params=params, factors=pieces, info={"loss": loss, "tokens": tokens})
