"""MEMIT (Meng et al. 2023): least-squares updates spread over a range of MLP layers.

For each request a target z for the residual stream after the last edited layer is optimised
(editlab.methods.zopt).  Then, layer by layer from the lowest, with K the (two-level averaged)
keys and R = (z − current output) / (layers left), the update is
Δ = R Kᵀ (λ C + K Kᵀ)⁻¹, solved in float64 and written in before the next layer's keys are read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence

import torch

from editlab.data.requests import EditRequest
from editlab.deltas import Delta
from editlab.methods.diagnostics import average_info
from editlab.methods.keyed import KeyValueEditor, KeyValueHparams, scratch_weights
from editlab.methods.keys import read_templates, two_level_mean
from editlab.methods.zopt import optimize_targets
from editlab.models.loading import LoadedModel
from editlab.registry import register_method


@dataclass(frozen=True)
class LayerSpreadHparams(KeyValueHparams):
    """What MEMIT and every method built on its z-and-spread scheme read (AlphaEdit stops here:
    it has no λ).  The defaults are the reference code's gpt2-xl values for MEMIT."""

    layers: List[int] = field(default_factory=lambda: [13, 14, 15, 16, 17])
    clamp_norm_factor: float = 0.75
    context_templates: List[List[int]] = field(default_factory=lambda: [[10, 5]])  # [length, count]

    def validate(self) -> None:
        super().validate()
        if not self.layers or sorted(self.layers) != list(self.layers):
            raise ValueError(f"memit.layers must be a non-empty ascending list, got {self.layers}")


@dataclass(frozen=True)
class MEMITHparams(LayerSpreadHparams):
    mom2_update_weight: float = 20000.0  # λ

    def validate(self) -> None:
        super().validate()
        if self.mom2_update_weight < 0:
            raise ValueError("memit.mom2_update_weight must be >= 0")


def memit_solve(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Δ = R Kᵀ (λC + K Kᵀ)⁻¹ as factors (R, A) with Δ = R Aᵀ, in float64.

    ``keys``: [d_in, n]; ``resid``: [d_out, n]; ``cov``: [d_in, d_in].  It minimises
    ‖Δ K − R‖² + λ tr(Δ C Δᵀ).
    """
    k = keys.double()
    adj = torch.linalg.solve(lam * cov.double() + k @ k.T, k)  # [d_in, n]
    return resid.double(), adj


@register_method("memit", hparams=MEMITHparams)
class MEMITEditor(KeyValueEditor):
    def targets(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> tuple[torch.Tensor, list[dict]]:
        """z for every request, at the residual output of the last edited layer: [d, n].
        All requests of the step are optimised together (one padded pass per step)."""
        block, z_layer = self.search_site(lm)
        results = optimize_targets(lm, requests, self.templates, block, z_layer, self.hp, fast=self.fast,
                                   bf16=self.hp.v_bf16, **self.target_options())
        for res in results:
            self.note_target_path(res.info)
        results = self.anchored(lm, requests, results)
        return torch.stack([r.target for r in results], 1), [r.info for r in results]

    def search_site(self, lm: LoadedModel) -> tuple[str, int]:
        return f"{lm.table.spec.layers}.{self.hp.layers[-1]}", self.hp.layers[-1]

    def solve(self, layer: int, keys: torch.Tensor, resid: torch.Tensor,
              lm: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors (R, A) of one layer's update Δ = R Aᵀ; descendants (EMMET, AlphaEdit, ENCORE)
        change only this.  Diagnostics go to ``self.solve_info``."""
        return memit_solve(keys, resid, self.stats.mom2(layer, keys.device), self.hp.mom2_update_weight)

    def edited(self, keys: dict[int, torch.Tensor]) -> None:
        """Called once a step's update is computed, with each layer's keys ``[d_in, n]``."""

    def apply(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> Delta:
        hp, table = self.hp, lm.table
        z_layer = hp.layers[-1]
        block = f"{table.spec.layers}.{z_layer}"
        names = {l: table.mlp_out_weight_name(l) for l in hp.layers}
        weights = {names[l]: table.mlp_out_weight(l) for l in hp.layers}
        zs, infos = self.targets(lm, requests)
        params, factors, step_keys = {}, {}, {}
        self.solve_info: dict[str, float] = {}
        with scratch_weights(weights):
            for i, layer in enumerate(hp.layers):
                # Every request's templates and the z layer's current output in one pass.
                reads = read_templates(lm, table.mlp_out_name(layer), self.templates, requests, outputs=(block,))
                keys = torch.stack([two_level_mean(k, self.templates) for k in reads.keys], 1)
                cur = reads.bare[block].T.float()
                resid = (zs.to(cur.device) - cur).to(keys.device) / (len(hp.layers) - i)
                r, a = self.solve(layer, keys, resid, lm)
                step_keys[layer] = keys
                upd, (left, right) = table.param_delta(r, a)
                upd = upd.float()
                w = weights[names[layer]]
                with torch.no_grad():
                    w.add_(upd.to(w.dtype))
                params[names[layer]] = upd
                factors[names[layer]] = [(left.float(), right.float())]
        self.edited(step_keys)
        info = {**average_info(infos), **self.solve_info}
        return Delta(params=params, factors=factors, info=info)
