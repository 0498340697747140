"""TIES merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models"),
as WISE merges its side-memory shards (EasyEdit's ``GTA('magnitude', 'sum', normalize=True)``).

Each model's task vector τᵢ = Wᵢ − W₀ is

1. *trimmed*: only its ``int(density · numel)`` largest-magnitude entries are kept;
2. weighted by wᵢ, and an entry's *sign is elected* as the sign of Σᵢ wᵢτᵢ (a zero sum counts
   as positive);
3. merged by a *disjoint mean*: per entry, the weighted mean over the models whose (weighted,
   trimmed) entry has the elected sign, Σ wᵢτᵢ·[agree] / Σ wᵢ·[agree], or 0 where none agrees.

A trimmed-away entry is 0, whose sign agrees with neither +1 nor −1, so it takes no part.
"""
from __future__ import annotations

from typing import Sequence

import torch


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``int(density · numel)`` largest-magnitude entries set to 0."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    if k < 1:
        raise ValueError(f"ties: density {density} keeps no entry of a {delta.numel()}-entry tensor")
    keep = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    keep[delta.abs().reshape(-1).topk(k).indices] = True
    return delta * keep.view_as(delta)


def ties_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
               density: float) -> torch.Tensor:
    """``base`` plus the TIES merge of the task vectors ``tensors[i] − base`` (module docstring),
    computed in float32 and returned in ``base``'s dtype."""
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"ties: {len(tensors)} tensors and {len(weights)} weights (need as many, at least one)")
    b = base.float()
    deltas = torch.stack([trim(t.float() - b, density) for t in tensors])
    w = torch.tensor(list(weights), dtype=torch.float32, device=b.device).view(-1, *([1] * b.dim()))
    weighted = deltas * w
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = (weighted.sign() == elected).float()
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return (b + (weighted * agree).sum(0) / divisor).to(base.dtype)
