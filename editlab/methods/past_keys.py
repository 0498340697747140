"""The keys of every edit made so far, for the methods that protect them in later solves.

AlphaEdit and ENCORE both add K_p K_pᵀ, the running second moment of past edits' keys, to their
layer solves; it is editor state, so it is checkpointed with the run and restored on resume.
"""
from __future__ import annotations

import torch

from editlab.methods.memit import MEMITEditor


class PastKeys:
    """Running Σ k kᵀ of the keys of every edit made so far, per layer."""

    def __init__(self):
        self.moments: dict[int, torch.Tensor] = {}

    def get(self, layer: int, d: int, device) -> torch.Tensor:
        m = self.moments.get(layer)
        return torch.zeros(d, d, dtype=torch.float64, device=device) if m is None else m.to(device)

    def add(self, keys: dict[int, torch.Tensor]) -> None:
        for layer, k in keys.items():
            k = k.double()
            self.moments[layer] = self.get(layer, k.shape[0], k.device) + k @ k.T

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(l): m.cpu() for l, m in self.moments.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.moments = {int(l): m.double() for l, m in state.items()}


class PastKeysEditor(MEMITEditor):
    """MEMIT whose ``solve`` may read ``self.past``: every step's keys are added after the step."""

    def __init__(self, hparams, ctx):
        super().__init__(hparams, ctx)
        self.past = PastKeys()

    def edited(self, keys):
        self.past.add(keys)

    def state_dict(self):
        return {**super().state_dict(), "past_keys": self.past.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.past.load_state_dict(state.get("past_keys") or {})
