"""The one place weights change: :class:`WeightWriter`, cumulative deltas over the base weights.

Edited parameters always hold exactly ``base + cumulative`` (not a running sum of in-place adds),
so restoring ``cumulative`` from a checkpoint reproduces the weights bit for bit.  Given a
``journal`` (:class:`editlab.journal.DeltaJournal`), every step applied with its ``span`` is also
recorded there on its own, so the model after any edit can be rebuilt.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from editlab.errors import BadEdit
from editlab.journal import as_column

# A step's factors must reproduce its dense delta to this relative Frobenius error: loose enough
# for a method that forms the product in bf16, tight enough to catch a wrong or transposed factor.
FACTOR_RTOL = 1e-2

@dataclass
class Delta:
    """An additive change to named parameters, in each parameter's own layout.

    ``factors[name]`` optionally holds low-rank pieces ``[(a, b), ...]`` with
    ``params[name] == sum(a @ b.T)``; the journal keeps them so any edit index can be rebuilt.
    """

    params: dict[str, torch.Tensor] = field(default_factory=dict)
    factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    info: dict[str, float] = field(default_factory=dict)  # method diagnostics, logged under method/


class WeightWriter:
    """Checks each delta and writes ``base + cumulative`` into the model; also resets and restores."""

    def __init__(self, model: nn.Module, max_delta_norm: float | None = None, journal=None):
        self.model = model
        self.max_delta_norm = math.inf if max_delta_norm is None else max_delta_norm
        self.journal = journal
        self.base: dict[str, torch.Tensor] = {}  # copies of the original weights of edited params
        self.cumulative: dict[str, torch.Tensor] = {}
        self._params = dict(model.named_parameters())

    def param(self, name: str) -> nn.Parameter:
        if name not in self._params:
            raise KeyError(f"delta names unknown parameter {name!r}")
        return self._params[name]

    def check(self, delta: Delta) -> dict[str, float]:
        """Refuse a bad delta (:class:`BadEdit`); else the Frobenius norm of each matrix's update."""
        norms = {}
        for name, d in delta.params.items():
            p = self.param(name)
            if d.shape != p.shape:
                raise BadEdit(f"delta for {name} has shape {tuple(d.shape)}, parameter has {tuple(p.shape)}")
            if not torch.isfinite(d).all():
                raise BadEdit(f"delta for {name} has NaN or Inf")
            norms[name] = float(d.float().norm())
            if norms[name] > self.max_delta_norm:
                raise BadEdit(f"delta for {name} has norm {norms[name]:.3g} > "
                              f"stream.max_delta_norm={self.max_delta_norm:g}")
        for name, pairs in delta.factors.items():
            self.check_factors(delta, name, pairs)
        return norms

    @staticmethod
    def check_factors(delta: Delta, name: str, pairs) -> None:
        """The journal rebuilds from factors, so they must be the delta the stream applied."""
        if name not in delta.params:
            raise BadEdit(f"factors given for {name} but no delta")
        d = delta.params[name].float()
        total = torch.zeros_like(d)
        for a, b in pairs:
            a, b = as_column(a), as_column(b)
            if a.dim() != 2 or b.dim() != 2 or (a.shape[0], b.shape[0]) != tuple(d.shape) or a.shape[1] != b.shape[1]:
                raise BadEdit(f"factors of {name} have shapes {tuple(a.shape)} and {tuple(b.shape)}; "
                              f"a @ b.T must have the delta's shape {tuple(d.shape)}")
            total += a.to(d.device, torch.float32) @ b.to(d.device, torch.float32).T
        err, norm = float((total - d).norm()), float(d.norm())
        if not err <= FACTOR_RTOL * norm + 1e-12:
            raise BadEdit(f"factors of {name} do not reproduce its delta (error {err:.3g}, delta norm {norm:.3g})")

    @torch.no_grad()
    def apply(self, delta: Delta, span: tuple[int, int] | None = None) -> dict[str, float]:
        """Add ``delta``; ``span`` = (first, last) edit it makes, for the journal.  Returns the
        Frobenius norm of each matrix's update, so that a disabling edit stands out in the logs."""
        norms = self.check(delta)  # all-or-nothing: nothing is written unless every piece is good
        if self.journal is not None and span is not None:
            self.journal.record(span[0], span[1], delta)
        for name, d in delta.params.items():
            p = self.param(name)
            if name not in self.base:
                self.base[name] = p.detach().clone()
                self.cumulative[name] = torch.zeros_like(p, dtype=torch.float32)
            self.cumulative[name] += d.to(self.cumulative[name])
            p.copy_(self.base[name] + self.cumulative[name].to(p.dtype))
        return norms

    @torch.no_grad()
    def restore(self, cumulative: dict[str, torch.Tensor]) -> None:
        """Put a saved cumulative delta onto the (unedited) model."""
        for name, c in cumulative.items():
            p = self.param(name)
            if name not in self.base:
                self.base[name] = p.detach().clone()
            self.cumulative[name] = c.to(device=p.device, dtype=torch.float32).clone()
            p.copy_(self.base[name] + self.cumulative[name].to(p.dtype))

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the base weights."""
        for name, base in self.base.items():
            self.param(name).copy_(base)
        self.cumulative = {n: torch.zeros_like(c) for n, c in self.cumulative.items()}

    @torch.no_grad()
    def distances(self) -> dict[str, dict[str, float]]:
        """Per edited parameter: ‖W−W₀‖_F / numel (the paper) and ‖W−W₀‖_F / ‖W₀‖_F."""
        out = {}
        for name, c in self.cumulative.items():
            fro = float(c.norm())
            out[name] = {"fro_per_numel": fro / c.numel(), "relative": fro / float(self.base[name].float().norm())}
        return out
