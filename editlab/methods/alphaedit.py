"""AlphaEdit (Fang et al. 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing").

MEMIT's targets and layer spreading; each layer's update is projected onto the null space of the
preserved keys' second moment C = E[k kᵀ], so that Δ k₀ = 0 for keys k₀ in C's principal span:
P = U Uᵀ over the eigenvectors of C whose eigenvalue is below ``nullspace_threshold``.  Keys of
past edits are kept as a running K_p K_pᵀ in the editor's state; with the step's keys K and
residuals R the update (reference ``upd = (P(K Kᵀ + K_p K_pᵀ) + L2 I)⁻¹ P K Rᵀ``, transposed) is
Δ = R Kᵀ P ((K Kᵀ + K_p K_pᵀ) P + L2 I)⁻¹, which lies in span(P) on its input side.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from editlab.data.requests import EditRequest
from editlab.methods.memit import LayerSpreadHparams
from editlab.methods.past_keys import PastKeysEditor
from editlab.models.loading import LoadedModel
from editlab.registry import register_method


@dataclass(frozen=True)
class AlphaEditHparams(LayerSpreadHparams):
    nullspace_threshold: float = 2e-2
    L2: float = 10.0

    def validate(self) -> None:
        super().validate()
        if self.nullspace_threshold <= 0 or self.L2 <= 0:
            raise ValueError("alphaedit needs nullspace_threshold > 0 and L2 > 0")


def null_space_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U Uᵀ over eigenvectors of the (symmetric) ``cov`` with eigenvalue < ``threshold``."""
    evals, evecs = torch.linalg.eigh(cov.double())
    u = evecs[:, evals < threshold]
    return u @ u.T


def alphaedit_solve(keys: torch.Tensor, resid: torch.Tensor, proj: torch.Tensor, past: torch.Tensor,
                    l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (R, A) with Δ = R Aᵀ, A = (P(K Kᵀ + K_p K_pᵀ) + L2 I)⁻¹ P K, in float64."""
    k, p = keys.double(), proj.double()
    lhs = p @ (k @ k.T + past.double()) + l2 * torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
    return resid.double(), torch.linalg.solve(lhs, p @ k)


@register_method("alphaedit", hparams=AlphaEditHparams)
class AlphaEditEditor(PastKeysEditor):
    def __init__(self, hparams, ctx):
        super().__init__(hparams, ctx)
        self.projectors: dict[int, torch.Tensor] = {}  # derived from the cached statistics

    def prepare(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> None:
        super().prepare(lm, requests)
        for layer in self.hp.layers:
            p = null_space_projector(self.stats.mom2(layer), self.hp.nullspace_threshold)
            if int(round(float(p.trace()))) == 0:
                raise ValueError(
                    f"alphaedit: no eigenvalue of layer {layer}'s key statistics is below "
                    f"nullspace_threshold={self.hp.nullspace_threshold:g}; the null space is empty, so no edit "
                    "could be written (raise the threshold)")
            self.projectors[layer] = p

    def solve(self, layer, keys, resid, lm):
        dev = lm.table.mlp_out_weight(layer).device  # the factors meet this weight
        proj = self.projectors[layer].to(dev)
        self.solve_info[f"nullspace_dim_L{layer}"] = float(round(float(proj.trace())))
        return alphaedit_solve(keys.to(dev), resid.to(dev), proj, self.past.get(layer, keys.shape[0], dev), self.hp.L2)
