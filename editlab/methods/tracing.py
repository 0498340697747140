"""Read and edit module inputs/outputs by name with forward hooks (kmeng01/memit's idea,
scoped to a ``with`` block so that no hook outlives the computation that needed it)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


class StopForward(Exception):
    """Raised from a hook once everything needed has been captured (skips the layers above)."""


def _first(x):
    return x[0] if isinstance(x, tuple) else x


@contextmanager
def trace(
    model: nn.Module,
    inputs: tuple[str, ...] = (),
    outputs: tuple[str, ...] = (),
    stop_after: str | None = None,
    stop_when_done: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Capture the first positional input of ``inputs`` modules and the (first) output of
    ``outputs`` modules into the yielded dict (keys ``"in:name"`` / ``"out:name"``).

    With ``stop_after`` the forward is cut short after that module ran, with ``stop_when_done``
    as soon as everything asked for is captured; wrap the call in ``try/except StopForward``.
    """
    got: dict[str, torch.Tensor] = {}
    handles = []
    wanted = len(set(inputs)) + len(set(outputs))

    def done() -> None:
        if stop_when_done and len(got) == wanted:
            raise StopForward

    try:
        for name in inputs:
            def pre(mod, args, name=name):
                got["in:" + name] = args[0]
                done()
            handles.append(model.get_submodule(name).register_forward_pre_hook(pre))
        for name in set(outputs) | ({stop_after} if stop_after else set()):
            def post(mod, args, out, name=name):
                if name in outputs:
                    got["out:" + name] = _first(out)
                    done()
                if name == stop_after:
                    raise StopForward
            handles.append(model.get_submodule(name).register_forward_hook(post))
        yield got
    finally:
        for h in handles:
            h.remove()


@contextmanager
def edit_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace a module's (first) output by ``fn(output)`` while the block is active."""

    def post(mod, args, out):
        if isinstance(out, tuple):
            return (fn(out[0]), *out[1:])
        return fn(out)

    handle = module.register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()
