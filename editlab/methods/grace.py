"""GRACE (Hartvigsen et al. 2023, "Aging with GRACE: Lifelong Model Editing with Discrete
Key-Value Adaptors").  Weights stay untouched: one MLP output projection is wrapped with a
codebook of (key, value, radius ε, label) entries.

The adaptor (a forward hook on that module, registered by ``prepare`` for the whole stream and
removed by ``close``) compares every position's input with the keys.  From the first position
of a sequence whose input lies within ε of a key, the module's output is replaced by that key's
value; a sequence with no such position is passed through untouched (bit for bit).

An edit's key is the module's input at the rewrite prompt's last token.  With d the distance to
the nearest key: beyond that key's ε + ``eps_init`` a new entry is added; within it, the same
label expands the nearest key's radius to d, a different label splits both radii to d/2 and
adds the new key (or, for the very same key, relabels the entry).  A new entry's value starts at the
module's own output and is trained so that the model completes the rewrite prompt with the new
target (teacher-forced NLL).
The codebook is the editor's state (checkpointed); a step's Delta has no weights and reports the
codebook's size and value norms, and how many of its edits took each :class:`Action`, in its info.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import List, Sequence

import torch

from editlab.data.requests import EditRequest
from editlab.deltas import Delta
from editlab.errors import EditFailed
from editlab.evaluate.scoring import encode, teacher_forced_nll
from editlab.methods.base import Editor
from editlab.methods.diagnostics import average_info
from editlab.methods.tracing import StopForward, trace
from editlab.models.loading import LoadedModel
from editlab.registry import register_method


class Action(IntEnum):
    """What an edit did to the codebook; an Enum, so a step's diagnostics count the actions
    instead of averaging their codes."""

    NEW = 0
    EXPAND = 1
    SPLIT = 2
    REPLACE = 3


NEW, EXPAND, SPLIT, REPLACE = Action

# A conflicting key closer than this fraction of eps_init is the same input edited again: the
# newer label replaces the entry's (a split would leave two balls of radius ~0).
SAME_KEY = 1e-3


@dataclass
class GRACEHparams:
    layers: List[int] = field(default_factory=lambda: [35])  # exactly one wrapped layer
    eps_init: float = 1.0  # radius of a new key (Euclidean, in the module's input space)
    lr: float = 1.0
    steps: int = 100
    early_stop_loss: float = 1e-2

    def validate(self) -> None:
        if len(self.layers) != 1:
            raise ValueError(f"grace wraps exactly one layer, got layers={self.layers}")
        if self.eps_init <= 0 or self.lr <= 0 or self.steps < 1:
            raise ValueError("grace needs eps_init > 0, lr > 0 and steps >= 1")


@register_method("grace", hparams=GRACEHparams)
class GRACEEditor(Editor):
    def __init__(self, hparams, ctx):
        super().__init__(hparams, ctx)
        self.keys: torch.Tensor | None = None  # [n, d_in]
        self.values: torch.Tensor | None = None  # [n, d_out]
        self.eps: torch.Tensor | None = None  # [n]
        self.labels: list[str] = []
        self._handle = None

    # -- the adaptor ------------------------------------------------------------------------
    def prepare(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> None:
        super().prepare(lm, requests)
        if self._handle is None:
            self._handle = lm.table.mlp_out(self.hp.layers[0]).register_forward_hook(self._adapt)

    def close(self) -> None:
        """Remove the adaptor from the model (the codebook stays in the editor)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _adapt(self, module, args, out):
        if self.keys is None or len(self.keys) == 0:
            return None
        x = args[0]
        # exact differences, not the |x|²+|k|²-2xk shortcut whose rounding is comparable to small ε
        keys = self.keys.to(x.device)[None].expand(len(x), -1, -1)
        dist = torch.cdist(x.float(), keys, compute_mode="donot_use_mm_for_euclid_dist")  # [B, T, n]
        nearest, idx = dist.min(-1)
        inside = nearest <= self.eps.to(x.device)[idx]
        if not bool(inside.any()):
            return None  # no position in any ball: the output is the module's own
        rows = inside.any(1).nonzero()[:, 0]
        first = inside[rows].float().argmax(1)  # first position inside a ball
        entry = idx[rows, first]
        pos = torch.arange(out.shape[1], device=out.device)
        mask = torch.zeros(out.shape[:2], dtype=torch.bool, device=out.device)
        mask[rows] = pos[None] >= first[:, None]
        vals = torch.zeros(len(out), out.shape[-1], dtype=self.values.dtype, device=out.device)
        vals = vals.index_copy(0, rows, self.values.to(out.device)[entry])
        return torch.where(mask[..., None], vals[:, None].to(out.dtype), out)

    # -- editing ------------------------------------------------------------------------------
    @torch.no_grad()
    def _key_and_output(self, lm: LoadedModel, req: EditRequest) -> tuple[torch.Tensor, torch.Tensor]:
        name = lm.table.mlp_out_name(self.hp.layers[0])
        ids = torch.tensor([encode(lm.tok, req.rewrite_prompt, req.target_new).prompt], device=lm.device)
        with trace(lm.model, inputs=(name,), outputs=(name,), stop_after=name) as got:
            try:
                lm.model(input_ids=ids, use_cache=False)
            except StopForward:
                pass
        return got["in:" + name][0, -1].float().clone(), got["out:" + name][0, -1].float().clone()

    def _train_value(self, lm: LoadedModel, req: EditRequest, j: int, init: torch.Tensor) -> tuple[float, int]:
        """Train entry ``j``'s value, whose ball holds the rewrite prompt's last input."""
        enc = encode(lm.tok, req.rewrite_prompt, req.target_new)
        value = init.clone().requires_grad_(True)
        opt = torch.optim.Adam([value], lr=self.hp.lr)
        below, above = self.values[:j], self.values[j + 1:]
        loss_value, steps = float("nan"), 0
        try:
            for _ in range(self.hp.steps):
                opt.zero_grad(set_to_none=True)
                self.values = torch.cat([below, value[None], above])
                loss = teacher_forced_nll(lm.model, [enc], lm.tok.pad_token_id)
                loss_value = float(loss.detach())
                if loss_value < self.hp.early_stop_loss:
                    break
                if not loss.requires_grad:
                    raise EditFailed(f"grace: case {req.case_id}'s key is outside its own ball "
                                     f"(radius {float(self.eps[j]):.3g})")
                loss.backward()
                opt.step()
                steps += 1
        finally:
            self.values = torch.cat([below, value.detach()[None], above])
        return loss_value, steps

    def _add(self, key, value, eps, label):
        row = lambda t, x: x[None] if t is None else torch.cat([t, x[None]])  # noqa: E731
        self.keys, self.values = row(self.keys, key), row(self.values, value)
        self.eps = row(self.eps, torch.tensor(float(eps), device=key.device))
        self.labels.append(label)

    def edit_one(self, lm: LoadedModel, req: EditRequest) -> dict[str, float | Action]:
        key, own = self._key_and_output(lm, req)
        if self.keys is not None:
            # The codebook lives with the wrapped module (a restored one arrives on the CPU), so
            # the adaptor never copies it across devices in a forward pass.
            self.keys, self.values, self.eps = (t.to(key.device) for t in (self.keys, self.values, self.eps))
        action, d = NEW, float("inf")
        if self.keys is not None and len(self.keys):
            dists = (self.keys - key).norm(dim=1)
            j = int(dists.argmin())
            d = float(dists[j])
            if d <= float(self.eps[j]) + self.hp.eps_init:
                action = EXPAND if self.labels[j] == req.target_new else SPLIT
        if action == SPLIT and d < SAME_KEY * self.hp.eps_init:
            action = REPLACE
        info = {"grace_action": action, "grace_nearest": d, "grace_loss": float("nan"), "grace_steps": 0.0}
        if action == EXPAND:
            self.eps[j] = max(float(self.eps[j]), d)
            return info
        if action == REPLACE:
            self.labels[j] = req.target_new
            info["grace_loss"], info["grace_steps"] = self._train_value(lm, req, j, own)
            return info
        if action == SPLIT:
            self.eps[j] = d / 2
        self._add(key, own, d / 2 if action == SPLIT else self.hp.eps_init, req.target_new)
        info["grace_loss"], info["grace_steps"] = self._train_value(lm, req, len(self.keys) - 1, own)
        return info

    def apply(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> Delta:
        if self._handle is None:
            raise RuntimeError("grace needs prepare() to put its adaptor on the model before apply()")
        info = average_info([self.edit_one(lm, r) for r in requests])
        norms = self.values.norm(dim=1)
        info.update({"codebook_size": float(len(self.keys)), "value_norm_mean": float(norms.mean()),
                     "value_norm_max": float(norms.max()), "eps_mean": float(self.eps.mean())})
        return Delta(info=info)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self):
        return {"keys": self.keys, "values": self.values, "eps": self.eps, "labels": list(self.labels)}

    def load_state_dict(self, state):
        self.keys, self.values, self.eps = state.get("keys"), state.get("values"), state.get("eps")
        self.labels = list(state.get("labels") or [])
        n = 0 if self.keys is None else len(self.keys)
        if any(t is not None and len(t) != n for t in (self.values, self.eps)) or len(self.labels) != n:
            raise ValueError(f"grace state: keys, values, eps and labels disagree in length (keys: {n})")
