"""The append-only delta journal: every applied step's own delta, so any edit index can be rebuilt.

A step (requests ``first..last``, edited together) is recorded per parameter as the low-rank
factors its method returned (ROME: one pair of vectors per edit; MEMIT: K and R per layer), or,
for methods without factors (FT-C), as the dense matrix only when ``checkpoint.dense_ledger`` is
on: a dense delta costs a full matrix per edit.  Otherwise the step is recorded as ``none`` and
the model can be rebuilt only at the checkpoints themselves.

Steps are buffered in memory and written as one safetensors shard per checkpoint interval,
``<root>/steps-<first>-<last>.safetensors`` (first/last edit covered).  Shards are only ever added;
the one exception is a resume from checkpoint E, which drops shards past E: the interrupted run
wrote them after its last committed checkpoint, and the resumed run records those edits again.
On disk the journal is a run's ``ledger/`` directory, in format ``editlab-ledger/1``: the names
it had before the class was renamed, so that older runs still resume and export.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

FORMAT = "editlab-ledger/1"
SHARD = re.compile(r"^steps-(\d{7})-(\d{7})\.safetensors$")


def shard_name(first: int, last: int) -> str:
    return f"steps-{first:07d}-{last:07d}.safetensors"


def as_column(x: torch.Tensor) -> torch.Tensor:
    """A factor in ``a @ b.T`` form: a vector is one column."""
    return x.reshape(x.shape[0], 1) if x.dim() == 1 else x


@dataclass
class Step:
    """One applied step: ``kinds[param]`` is ``factors``, ``dense`` or ``none`` (not recorded)."""

    first: int
    last: int
    kinds: dict[str, str]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # "<param>/a0", "<param>/dense"

    @property
    def recorded(self) -> bool:
        return all(k != "none" for k in self.kinds.values())

    def delta(self, name: str) -> torch.Tensor:
        """The dense float32 delta this step added to ``name``."""
        kind = self.kinds[name]
        if kind == "dense":
            return self.tensors[f"{name}/dense"]
        if kind != "factors":
            raise ValueError(f"edits {self.first}..{self.last}: the delta of {name} was not recorded")
        total, k = None, 0
        while f"{name}/a{k}" in self.tensors:
            term = self.tensors[f"{name}/a{k}"] @ self.tensors[f"{name}/b{k}"].T
            total = term if total is None else total + term
            k += 1
        return total


class DeltaJournal:
    """Records the steps the :class:`editlab.deltas.WeightWriter` applies; flushed at checkpoints."""

    def __init__(self, root: str | Path, dense: bool = False):
        self.root = Path(root)
        self.dense = dense
        self.pending: list[Step] = []
        self.upto = 0  # last edit covered by a shard on disk

    # -- recording ---------------------------------------------------------------------
    def record(self, first: int, last: int, delta) -> None:
        """Buffer one applied step (``delta`` is a :class:`editlab.deltas.Delta` already checked)."""
        kinds, tensors = {}, {}
        for name, d in delta.params.items():
            if name in delta.factors:
                kinds[name] = "factors"
                for k, (a, b) in enumerate(delta.factors[name]):
                    tensors[f"{name}/a{k}"] = as_column(a).detach().to("cpu", torch.float32, copy=True).contiguous()
                    tensors[f"{name}/b{k}"] = as_column(b).detach().to("cpu", torch.float32, copy=True).contiguous()
            elif self.dense:
                kinds[name] = "dense"
                tensors[f"{name}/dense"] = d.detach().to("cpu", torch.float32, copy=True).contiguous()
            else:
                kinds[name] = "none"
        self.pending.append(Step(first, last, kinds, tensors))

    def flush(self, upto: int) -> Path | None:
        """Write the buffered steps (edits ``self.upto+1 .. upto``) as one shard, atomically."""
        if upto <= self.upto:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / shard_name(self.upto + 1, upto)
        tensors = {f"{s.last:07d}/{k}": t for s in self.pending for k, t in s.tensors.items()}
        meta = {
            "format": FORMAT,
            "steps": json.dumps([{"first": s.first, "last": s.last, "params": s.kinds} for s in self.pending]),
        }
        tmp = path.with_name(f".tmp-{path.name}")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.pending, self.upto = [], upto
        return path

    def rewind(self, edit: int) -> None:
        """Continue after edit ``edit``: drop buffered steps and shards that start past it."""
        self.pending = []
        for first, last, path in shards(self.root):
            if first > edit:
                log.warning("dropping ledger shard %s: written after the checkpoint at edit %d", path, edit)
                path.unlink()
            elif last > edit:
                raise ValueError(f"ledger shard {path} straddles the resume point (edit {edit})")
        for tmp in self.root.glob(".tmp-*") if self.root.exists() else []:
            tmp.unlink()
        self.upto = edit


def shards(root: str | Path) -> list[tuple[int, int, Path]]:
    root = Path(root)
    if not root.exists():
        return []
    out = []
    for p in root.iterdir():
        m = SHARD.match(p.name)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), p))
    return sorted(out)


def read_steps(root: str | Path, upto: int) -> Iterator[Step]:
    """Every recorded step with ``last <= upto``, in order, one shard in memory at a time."""
    expected = 1
    for first, last, path in shards(root):
        if first > upto:
            break
        if first != expected:
            raise ValueError(f"ledger {root} has no shard for edits {expected}..{first - 1}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
                steps = json.loads(meta["steps"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ValueError(f"ledger shard {path} is unreadable: {e}") from e
        for s in steps:
            if s["last"] > upto:
                return
            prefix = f"{s['last']:07d}/"
            own = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
            yield Step(s["first"], s["last"], s["params"], own)
        expected = last + 1
