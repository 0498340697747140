"""ROME (Meng et al. 2022): a rank-one update of one MLP output projection.

W' = W + (v* − W k) uᵀ / (uᵀ k) with u = C⁻¹ k̄ / ‖C⁻¹ k̄‖, k̄ the key averaged over context
templates and v* the optimised value (editlab.methods.zopt).  ``variant=original`` (the reference
code, used by the paper) takes k and Wk from the bare prompt while u uses the averaged key;
``variant=r-rome`` uses k̄ throughout, which removes the disabling edits (Gupta et al. 2024).
Either way the edited layer maps that k to v* exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from editlab.data.requests import EditRequest
from editlab.deltas import Delta
from editlab.methods.diagnostics import average_info
from editlab.methods.keyed import KeyValueEditor, KeyValueHparams, scratch_weights
from editlab.methods.keys import read_templates
from editlab.methods.zopt import optimize_targets
from editlab.models.loading import LoadedModel
from editlab.registry import register_method


@dataclass(frozen=True)
class ROMEHparams(KeyValueHparams):
    variant: str = "original"  # original (the paper) | r-rome (consistent template-averaged keys)
    mom2_adjustment: bool = True  # u = C⁻¹ k̄ (false: u = k̄, and no key statistics)
    norm_anchor_skip_factor: float = 5.0  # ROME's v* is the MLP output itself: a looser bound than MEMIT's 2

    def validate(self) -> None:
        super().validate()
        if self.variant not in ("original", "r-rome"):
            raise ValueError(f"rome.variant must be 'original' or 'r-rome', got {self.variant!r}")
        if len(self.layers) != 1:
            raise ValueError(f"rome edits exactly one layer, got layers={self.layers}")


@dataclass
class RankOne:
    """One ROME update in maths orientation: ΔW = right ⊗ left, with the pair it enforces."""

    left: torch.Tensor  # u
    right: torch.Tensor
    key: torch.Tensor  # the k with W' k = v*
    value: torch.Tensor  # v*


@register_method("rome", hparams=ROMEHparams)
class ROMEEditor(KeyValueEditor):
    @property
    def uses_stats(self) -> bool:
        return self.hp.mom2_adjustment

    def search_site(self, lm: LoadedModel) -> tuple[str, int]:
        return lm.table.mlp_out_name(self.hp.layers[0]), self.hp.layers[0]

    def rank_one(self, lm: LoadedModel, req: EditRequest) -> tuple[RankOne, dict]:
        layer = self.hp.layers[0]
        module = lm.table.mlp_out_name(layer)
        reads = read_templates(lm, module, self.templates, [req])
        keys = reads.keys[0]
        k_avg = keys.mean(0).double()  # ROME averages its templates flat (MEMIT: two levels)
        u = k_avg
        if self.hp.mom2_adjustment:
            u = torch.linalg.solve(self.stats.mom2(layer, keys.device).double(), k_avg)
        u = u / u.norm()
        res, = optimize_targets(lm, [req], self.templates, module, layer, self.hp, fast=self.fast,
                                argmax_patience=self.hp.v_argmax_patience, bf16=self.hp.v_bf16)
        self.note_target_path(res.info)
        res, = self.anchored(lm, [req], [res])
        if self.hp.variant == "original":
            k, wk = reads.bare["in:" + module][0].double(), reads.bare[module][0].double()
        else:
            k = k_avg
            with torch.no_grad():
                wk = lm.table.mlp_out(layer)(k.to(keys.dtype)[None])[0].double()
        v_star = res.target.double().to(wk.device)
        right = (v_star - wk) / torch.dot(k, u)
        return RankOne(left=u, right=right, key=k, value=v_star), res.info

    def apply(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> Delta:
        layer = self.hp.layers[0]
        name = lm.table.mlp_out_weight_name(layer)
        w = lm.table.mlp_out_weight(layer)
        total = torch.zeros_like(w, dtype=torch.float32)
        factors, infos = [], []
        # Several requests in one step are applied one after another, each seeing the last.
        with scratch_weights({name: w}):
            for req in requests:
                r1, info = self.rank_one(lm, req)
                upd, (a, b) = lm.table.param_delta(r1.right[:, None], r1.left[:, None])
                upd = upd.float()
                with torch.no_grad():
                    w.add_(upd.to(w.dtype))
                total += upd
                factors.append((a.float(), b.float()))
                infos.append(info)
        return Delta(params={name: total}, factors={name: factors}, info=average_info(infos))
