"""Rank-one factors of an MLP matrix's gradient, and forward passes with low-rank updates added.

For ``y = W x`` applied at every token, ``dL/dW = sum_t delta_t x_t^T`` with ``delta_t = dL/dy_t``.
MEND never forms that matrix: it transforms the pairs ``(x_t, delta_t)``.  ``delta`` is read off a
zero "probe" added to the module's output, so the graph through the module stays intact and the
gradient of an earlier edited layer still flows through the later ones.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch

from editlab.evaluate.scoring import Encoded, teacher_forced_nll
from editlab.models.arch import ModuleTable
from editlab.models.loading import LoadedModel


@contextmanager
def probed(table: ModuleTable, layers: Sequence[int]) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """While active, each forward records ``layer -> (input, probe)`` of the layers' MLP output."""
    store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_hook(layer: int):
        def hook(module, args, out):
            probe = torch.zeros_like(out, requires_grad=True)
            store[layer] = (args[0].detach(), probe)
            return out + probe
        return hook

    handles = [table.mlp_out(l).register_forward_hook(make_hook(l)) for l in layers]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def real_positions(encs: Sequence[Encoded], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every non-padding position of ``target_logprobs``' padded batch."""
    lens = [len(e.prompt) + len(e.target) - 1 for e in encs]
    rows = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(lens)])
    cols = torch.cat([torch.arange(n) for n in lens])
    return rows.to(device), cols.to(device)


def gradient_factors(
    lm: LoadedModel, layers: Sequence[int], encs: Sequence[Encoded]
) -> tuple[float, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """The edit loss and, per layer, ``(x [n, in], delta [n, out])`` over the batch's real tokens.

    ``delta.T @ x`` is the loss's gradient w.r.t. the layer's weight in maths orientation
    ``[out, in]`` (``lm.table.to_param`` turns it into GPT-2's ``[in, out]`` Conv1D layout).
    """
    with torch.enable_grad(), probed(lm.table, layers) as store:
        loss = teacher_forced_nll(lm.model, encs, lm.tok.pad_token_id)
        missing = [l for l in layers if l not in store]
        if missing:
            raise RuntimeError(f"MLP output of layers {missing} was not called in the forward pass")
        grads = torch.autograd.grad(loss, [store[l][1] for l in layers])
    out = {}
    for l, g in zip(layers, grads):
        x = store[l][0]
        rows, cols = real_positions(encs, x.device)  # x and g sit on layer l's device
        out[l] = (x[rows, cols].float(), g[rows, cols].float())
    return float(loss.detach()), out


@contextmanager
def with_updates(table: ModuleTable, updates: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Forward passes as if ``W_l += a_l @ b_l.T`` (maths orientation), differentiably in a, b.

    ``a: [out, k]``, ``b: [in, k]``; the module's output gains ``x @ b @ a.T`` without any dense
    ``[out, in]`` matrix being formed or any weight being touched.
    """
    def make_hook(a: torch.Tensor, b: torch.Tensor):
        def hook(module, args, out):
            x = args[0]
            # a, b come from the network's device; the copy is differentiable
            return out + ((x.to(b.dtype) @ b.to(x.device)) @ a.to(x.device).T).to(out.dtype)
        return hook

    handles = [table.mlp_out(l).register_forward_hook(make_hook(a, b)) for l, (a, b) in updates.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
