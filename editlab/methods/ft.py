"""FT-C: constrained fine-tuning of one MLP output matrix (the paper's baseline).

After every Adam step each weight is clamped into an L∞ ball of radius ``norm_constraint``
around its anchor.  ``anchor=edit`` re-centres the ball at the start of every edit, as the
reference code does, so drift across a stream is unbounded; ``anchor=run`` keeps it at the
unedited weights, so ‖W−W₀‖∞ ≤ ε for the whole run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence

import torch

from editlab.data.requests import EditRequest
from editlab.evaluate.scoring import encode, teacher_forced_nll
from editlab.methods.base import Delta, Editor
from editlab.models.loading import LoadedModel
from editlab.registry import register_method


@dataclass
class FTHparams:
    layers: List[int] = field(default_factory=lambda: [17])
    lr: float = 5e-4
    steps: int = 25
    early_stop_loss: float = 1e-2
    norm_constraint: float = 5e-4  # L∞ radius ε of the clamp
    weight_decay: float = 0.0
    anchor: str = "edit"  # edit (reference code) | run (drift bounded by ε over the run)
    objective: str = "teacher_forced"  # teacher_forced | last_token (reference code; paper only)

    def validate(self) -> None:
        if self.anchor not in ("edit", "run"):
            raise ValueError(f"ft.anchor must be 'edit' or 'run', got {self.anchor!r}")
        if self.objective not in ("teacher_forced", "last_token"):
            raise ValueError(f"ft.objective must be 'teacher_forced' or 'last_token', got {self.objective!r}")
        if self.norm_constraint <= 0 or self.steps < 1 or not self.layers:
            raise ValueError("ft needs norm_constraint > 0, steps >= 1 and at least one layer")


@register_method("ft", hparams=FTHparams)
class FTEditor(Editor):
    def prepare(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> None:
        super().prepare(lm, requests)
        # The run anchor is the unedited weights; prepare always sees the unedited model.
        self._run_anchor = {
            lm.table.mlp_out_weight_name(l): lm.table.mlp_out_weight(l).detach().clone() for l in self.hp.layers
        }

    def loss(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> torch.Tensor:
        encs = [encode(lm.tok, r.rewrite_prompt, r.target_new) for r in requests]
        return teacher_forced_nll(lm.model, encs, lm.tok.pad_token_id, last_token=self.hp.objective == "last_token")

    def apply(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> Delta:
        hp = self.hp
        names = [lm.table.mlp_out_weight_name(l) for l in hp.layers]
        params = [lm.table.mlp_out_weight(l) for l in hp.layers]
        start = [p.detach().clone() for p in params]
        if hp.anchor == "run" and not hasattr(self, "_run_anchor"):
            raise RuntimeError("ft with anchor=run needs prepare() on the unedited model before apply()")
        anchors = start if hp.anchor == "edit" else [self._run_anchor[n] for n in names]
        opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        for p in params:
            p.requires_grad_(True)
        steps, loss_value = 0, float("nan")  # optimizer steps taken, last loss seen
        try:
            for _ in range(hp.steps):
                opt.zero_grad(set_to_none=True)
                loss = self.loss(lm, requests)
                loss_value = float(loss.detach())
                # As the reference code: a loss already below the threshold takes no step and stops.
                if loss_value < hp.early_stop_loss:
                    break
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for p, a in zip(params, anchors):
                        p.copy_(torch.clamp(p, a - hp.norm_constraint, a + hp.norm_constraint))
                steps += 1
        finally:
            delta = {}
            with torch.no_grad():
                for n, p, s in zip(names, params, start):
                    delta[n] = p.detach() - s
                    p.copy_(s)
                    p.requires_grad_(False)
        return Delta(params=delta, info={"loss": loss_value, "steps": steps})

    def state_dict(self):
        return {}
