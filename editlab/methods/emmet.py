"""EMMET (Gupta, Sajjad, Anumanchipalli 2024, "A Unified Framework for Model Editing").

MEMIT's targets and layer spreading, but each layer's batch is written with *equality*
constraints W' k_i = W k_i + r_i instead of MEMIT's least squares:
Δ = R (Kᵀ C⁻¹ K + λ_emmet I)⁻¹ Kᵀ C⁻¹, with C = mom2_update_weight · E[k kᵀ].
With λ_emmet = 0 every key of the batch is mapped exactly; λ_emmet > 0 relaxes that for
batches whose keys are nearly dependent.  When the inner n×n matrix is too ill-conditioned for a
solve, its pseudo-inverse is used and the step's info says so (``emmet_pinv``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from editlab.methods.memit import MEMITEditor, MEMITHparams
from editlab.registry import register_method


@dataclass(frozen=True)
class EMMETHparams(MEMITHparams):
    emmet_lambda: float = 0.1
    max_condition: float = 1e10  # inner matrix condition number above which pinv is used

    def validate(self) -> None:
        super().validate()
        if self.emmet_lambda < 0 or self.max_condition <= 1:
            raise ValueError("emmet needs emmet_lambda >= 0 and max_condition > 1")


def emmet_solve(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, lam: float,
                max_condition: float = 1e10) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Δ = R (Kᵀ C⁻¹ K + λ I)⁻¹ Kᵀ C⁻¹ as factors (R', A) with Δ = R' Aᵀ, in float64.

    ``keys``: [d_in, n]; ``resid``: [d_out, n]; ``cov``: C [d_in, d_in], symmetric positive definite.
    """
    k = keys.double()
    c_inv_k = torch.linalg.solve(cov.double(), k)  # C⁻¹ K  [d_in, n]
    inner = k.T @ c_inv_k + lam * torch.eye(k.shape[1], dtype=k.dtype, device=k.device)
    cond = float(torch.linalg.cond(inner))
    pinv = not cond < max_condition  # also catches inf / nan
    inv = torch.linalg.pinv(inner, hermitian=True) if pinv else torch.linalg.inv(inner)
    # Δ = (R inv) (C⁻¹ K)ᵀ; inner and C are symmetric.
    return resid.double() @ inv, c_inv_k, {"emmet_cond": cond, "emmet_pinv": float(pinv)}


@register_method("emmet", hparams=EMMETHparams)
class EMMETEditor(MEMITEditor):
    def solve(self, layer, keys, resid, lm):
        dev = lm.table.mlp_out_weight(layer).device  # the factors meet this weight
        cov = self.hp.mom2_update_weight * self.stats.mom2(layer, dev).double()
        r, a, info = emmet_solve(keys.to(dev), resid.to(dev), cov, self.hp.emmet_lambda, self.hp.max_condition)
        # One step edits several layers: report the worst conditioning and any fallback.
        self.solve_info["emmet_cond"] = max(self.solve_info.get("emmet_cond", 0.0), info["emmet_cond"])
        self.solve_info["emmet_pinv"] = max(self.solve_info.get("emmet_pinv", 0.0), info["emmet_pinv"])
        return r, a
