"""ENCORE (Gupta et al. 2025, "Lifelong Sequential Knowledge Editing without Model Degradation").

MEMIT with two changes against overfitting and norm growth:
* most-probable early stopping (MPES): the target optimisation stops once every target token is
  the argmax on every rewriting prompt for ``v_argmax_patience`` consecutive steps (the switch
  ROME and MEMIT have too, off there by default, on here);
* a norm constraint in the layer solve, with the keys of past edits preserved as well:
  Δ = R Kᵀ (λ C + K_p K_pᵀ + K Kᵀ + λ_n I)⁻¹, minimiser of
  ‖Δ K − R‖² + λ tr(Δ C Δᵀ) + ‖Δ K_p‖² + λ_n ‖Δ‖²_F.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from editlab.methods.memit import MEMITHparams
from editlab.methods.past_keys import PastKeysEditor
from editlab.registry import register_method


@dataclass(frozen=True)
class ENCOREHparams(MEMITHparams):
    v_argmax_patience: int = 2  # MPES: on by default for ENCORE
    norm_constraint: float = 10.0  # λ_n

    def validate(self) -> None:
        super().validate()
        if self.v_argmax_patience < 1 or self.norm_constraint < 0:
            raise ValueError("encore needs v_argmax_patience >= 1 (its MPES) and norm_constraint >= 0")


def encore_solve(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, lam: float, past: torch.Tensor,
                 lam_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (R, A) with Δ = R Aᵀ, A = (λC + K_p K_pᵀ + K Kᵀ + λ_n I)⁻¹ K, in float64."""
    k = keys.double()
    eye = torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
    return resid.double(), torch.linalg.solve(lam * cov.double() + past.double() + k @ k.T + lam_norm * eye, k)


@register_method("encore", hparams=ENCOREHparams)
class ENCOREEditor(PastKeysEditor):
    def solve(self, layer, keys, resid, lm):
        dev = lm.table.mlp_out_weight(layer).device  # the factors meet this weight
        past = self.past.get(layer, keys.shape[0], dev)
        return encore_solve(keys.to(dev), resid.to(dev), self.stats.mom2(layer, dev), self.hp.mom2_update_weight,
                            past, self.hp.norm_constraint)
