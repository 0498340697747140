"""The MEND editor network.

Per token, the pair ``(x, delta)`` of an edited matrix is normalised (running mean/std kept per
layer during training, frozen afterwards), concatenated and passed through residual low-rank
blocks ``h + U relu((V h) * s_l + o_l)``: ``U`` starts at zero so the network starts as the
identity, and ``s_l, o_l`` are the per-layer scale/offset that let layers of one shape share
``U, V``.  The output splits back into ``(x~, delta~)`` and the update is
``W_l <- W_l - alpha_l * sum_t delta~_t x~_t^T`` with a learned step size ``alpha_l`` per layer.
The update is returned as factors ``(a, b)`` with ``dW = a @ b.T``: its rank is at most the
number of tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class NetSpec:
    """What fixes the network's shape; saved next to its weights."""

    layers: tuple[int, ...]
    shapes: tuple[tuple[int, int], ...]  # per layer (out, in) in maths orientation
    rank: int = 192
    depth: int = 2
    init_lr: float = 1e-4

    def validate(self) -> None:
        if len(self.layers) != len(self.shapes) or not self.layers:
            raise ValueError(f"MEND needs one (out, in) shape per layer; got layers {self.layers}, "
                             f"shapes {self.shapes}")
        if self.rank < 1 or self.depth < 1 or not self.init_lr > 0:
            raise ValueError("MEND needs rank >= 1, depth >= 1 and init_lr > 0")


class RunningNorm(nn.Module):
    """Per-mode running mean/variance (Chan et al.'s parallel update), frozen in eval mode."""

    def __init__(self, n_modes: int, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros(n_modes))
        self.register_buffer("mean", torch.zeros(n_modes, dim))
        self.register_buffer("m2", torch.zeros(n_modes, dim))
        self.frozen = False  # True: statistics stay fixed even in training mode

    def forward(self, v: torch.Tensor, mode: int) -> torch.Tensor:
        if self.training and not self.frozen:
            with torch.no_grad():
                n, mu, m2 = v.shape[0], v.mean(0), ((v - v.mean(0)) ** 2).sum(0)
                c = self.count[mode]
                d = mu - self.mean[mode]
                tot = c + n
                self.mean[mode] += d * n / tot
                self.m2[mode] += m2 + d ** 2 * c * n / tot
                self.count[mode] = tot
        if self.count[mode] < 2:
            return v
        std = (self.m2[mode] / (self.count[mode] - 1)).sqrt().clamp_min(1e-8)
        return (v - self.mean[mode]) / std


class LowRankBlock(nn.Module):
    def __init__(self, dim: int, rank: int, n_modes: int):
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # identity at initialisation
        nn.init.zeros_(self.up.bias)
        self.scale = nn.Parameter(torch.ones(n_modes, rank))
        self.offset = nn.Parameter(torch.zeros(n_modes, rank))

    def forward(self, h: torch.Tensor, mode: int) -> torch.Tensor:
        return h + self.up(torch.relu(self.down(h) * self.scale[mode] + self.offset[mode]))


class GradientTransform(nn.Module):
    """Shared by all layers of one (out, in) shape; ``mode`` is the layer's index in the group."""

    def __init__(self, out_dim: int, in_dim: int, n_modes: int, rank: int, depth: int):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.norm_x = RunningNorm(n_modes, in_dim)
        self.norm_delta = RunningNorm(n_modes, out_dim)
        self.blocks = nn.ModuleList(LowRankBlock(in_dim + out_dim, rank, n_modes) for _ in range(depth))

    def forward(self, x: torch.Tensor, delta: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.cat([self.norm_x(x, mode), self.norm_delta(delta, mode)], dim=-1)
        for block in self.blocks:
            h = block(h, mode)
        return h[:, : self.in_dim], h[:, self.in_dim:]


class MENDNet(nn.Module):
    def __init__(self, spec: NetSpec):
        super().__init__()
        spec.validate()
        self.spec = spec
        groups: dict[tuple[int, int], list[int]] = {}
        for layer, shape in zip(spec.layers, spec.shapes):
            groups.setdefault(tuple(shape), []).append(layer)
        self.transforms = nn.ModuleDict()
        self._route: dict[int, tuple[str, int]] = {}  # layer -> (group key, mode)
        for (out_dim, in_dim), members in groups.items():
            key = f"{out_dim}x{in_dim}"
            self.transforms[key] = GradientTransform(out_dim, in_dim, len(members), spec.rank, spec.depth)
            for mode, layer in enumerate(members):
                self._route[layer] = (key, mode)
        self.lrs = nn.Parameter(torch.full((len(spec.layers),), float(spec.init_lr)))

    def update(self, layer: int, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors ``(a [out, n], b [in, n])`` of the edit ``dW = a @ b.T`` of ``layer``."""
        if layer not in self._route:
            raise KeyError(f"this MEND editor was trained for layers {list(self.spec.layers)}, not {layer}")
        key, mode = self._route[layer]
        p = next(self.parameters())
        x_t, d_t = self.transforms[key](x.to(p), delta.to(p), mode)
        lr = self.lrs[self.spec.layers.index(layer)]
        return -lr * d_t.T, x_t.T

    def freeze_statistics(self, frozen: bool = True) -> None:
        for m in self.modules():
            if isinstance(m, RunningNorm):
                m.frozen = frozen

    def updates(self, factors: dict[int, tuple[torch.Tensor, torch.Tensor]]
                ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return {l: self.update(l, x, d) for l, (x, d) in factors.items()}


def spec_from_model(table, layers: Sequence[int], rank: int, depth: int, init_lr: float) -> NetSpec:
    shapes = tuple(tuple(table.to_math(table.mlp_out_weight(l)).shape) for l in layers)
    return NetSpec(layers=tuple(layers), shapes=shapes, rank=rank, depth=depth, init_lr=init_lr)
