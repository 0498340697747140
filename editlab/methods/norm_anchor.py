"""Norm-anchor scaling (NAS, arXiv 2602.02543; official code SasyaTitech/NAS), ``norm_anchor=true``.

Sequential ROME/MEMIT edits collapse partly because some optimised values v* are much longer than
the model's own.  NAS measures, once per model and layer on the *unedited* model, ν: the
upper-trimmed mean of ‖v*‖ over a seeded sample of CounterFact rewrites, each searched on its
bare prompt (no context templates) with the method's own v*/z search (editlab.methods.zopt).  Here
v* = v0 + δ, v0 the MLP output at the subject's last token and δ what the search adds (for ROME,
at that MLP output, so v* is the searched value itself; for MEMIT's family, at the residual stream
of the last edited layer).  Every edit then rescales its v* to norm ν, or, when ‖v*‖ exceeds
``norm_anchor_skip_factor``·ν, is refused (:class:`editlab.errors.EditFailed`), which the stream
records as a failed edit; the official code writes v* = v0 there, an edit that changes nothing.

The ‖v*‖ sample is an artifact like the key statistics: computed once per (model id, layer,
searched module, pool file, sample count, seed, search settings), saved under
``<cache_dir>/norm_anchor/`` with that key in its metadata, behind the same file lock.  The
trimmed mean is taken on load, so the trim fraction is not part of the key.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file

from editlab.data.requests import EditRequest
from editlab.errors import EditFailed
from editlab.methods.keys import read_at_subject
from editlab.methods.stats import file_lock, save_atomic
from editlab.methods.zopt import TargetResult, optimize_targets
from editlab.models.loading import LoadedModel

log = logging.getLogger(__name__)

SEED = 0  # the official sample's seed (random.Random(0).sample), so that ν is one per model and layer
BATCH = 16  # requests searched together (the official batch); Adam is per request, so only speed depends on it
BARE = [["{}"]]  # the official statistic's prompts: the request's own, no context templates
SEARCH_FIELDS = ("v_lr", "v_steps", "v_weight_decay", "clamp_norm_factor", "kl_factor", "early_stop_loss", "v_bf16")


@dataclass(frozen=True)
class AnchorKey:
    """What decides the ‖v*‖ sample, and so its cache file."""

    model_id: str
    layer: int
    module: str  # where the search adds δ
    pool: str  # the CounterFact file the sample is drawn from, relative to the data root
    n_samples: int
    seed: int
    search: str  # the search settings, as sorted JSON

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def trimmed_mean(values: Sequence[float], trim: float) -> float:
    """The mean after dropping the largest floor(trim·n) values (the official upper trim)."""
    v = sorted(float(x) for x in values)
    kept = v[: len(v) - math.floor(trim * len(v))]
    if not kept:
        raise ValueError(f"norm_anchor_trim={trim} drops all {len(v)} samples")
    return math.fsum(kept) / len(kept)


def draw(pool: Sequence[EditRequest], n: int, seed: int = SEED) -> list[EditRequest]:
    """``n`` requests of ``pool`` by ``random.Random(seed).sample``, or all of it when it is smaller."""
    return list(pool) if n >= len(pool) else random.Random(seed).sample(list(pool), n)


def mlp_values(lm: LoadedModel, requests: Sequence[EditRequest], results: Sequence[TargetResult], module: str,
               layer: int) -> torch.Tensor:
    """v0 per request, ``[n, d]``: the MLP output of ``layer`` at the bare prompt's subject token.
    Where the search itself ran at that output (ROME), it is the search's own ``target_init``."""
    init = torch.stack([r.target_init for r in results])
    mlp = lm.table.mlp_out_name(layer)
    if module == mlp:
        return init
    got = read_at_subject(lm, [r.prompt for r in requests], [r.subject for r in requests], outputs=(mlp,))
    return got["out:" + mlp].to(init.device, init.dtype)


def vstar_norms(lm: LoadedModel, requests: Sequence[EditRequest], module: str, layer: int, hp, fast: bool = True,
                argmax_patience: int = 0, progress: Callable[[int], None] | None = None) -> list[float]:
    """‖v0 + δ‖ of each request, δ searched on its bare prompt on the model as it is."""
    out: list[float] = []
    for s in range(0, len(requests), BATCH):
        batch = requests[s: s + BATCH]
        results = optimize_targets(lm, batch, BARE, module, layer, hp, fast=fast, argmax_patience=argmax_patience,
                                   bf16=hp.v_bf16)
        v0 = mlp_values(lm, batch, results, module, layer)
        v_star = v0 + torch.stack([r.delta for r in results])
        out += v_star.double().norm(dim=1).tolist()
        if progress is not None:
            progress(len(batch))
    return out


class NormAnchor:
    """ν for one editor (no global cache) and the per-edit rescaling."""

    def __init__(self, cache_dir: Path, trim: float, skip_factor: float):
        self.dir = Path(cache_dir) / "norm_anchor"
        self.trim, self.skip_factor = trim, skip_factor
        self.norms: list[float] | None = None
        self.nu: float | None = None

    def path(self, key: AnchorKey) -> Path:
        safe = key.model_id.replace("/", "--").replace(":", "-")
        return self.dir / f"{safe}-L{key.layer}-{key.n_samples}-s{key.seed}-{key.digest()}.safetensors"

    def ensure(self, lm: LoadedModel, key: AnchorKey, pool: Callable[[], Sequence[EditRequest]],
               compute: Callable[[Sequence[EditRequest]], list[float]]) -> float:
        """Load the ‖v*‖ sample of ``key`` or compute it (``compute`` on ``n_samples`` of ``pool()``,
        on the unedited model), then set ν."""
        p = self.path(key)
        if not p.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            with file_lock(p):
                if not p.exists():  # another job may have saved it while this one waited
                    norms = compute(draw(pool(), key.n_samples, key.seed))
                    meta = {k: str(v) for k, v in asdict(key).items()}
                    save_atomic({"vstar_norms": torch.tensor(norms, dtype=torch.float64)}, p, meta)
                    log.info("saved the norm-anchor ‖v*‖ sample %s", p)
        self.norms = load_file(p)["vstar_norms"].tolist()
        self.nu = trimmed_mean(self.norms, self.trim)
        log.info("norm anchor: ν = %.6g at layer %d (trimmed mean of %d ‖v*‖, raw mean %.6g)",
                 self.nu, key.layer, len(self.norms), math.fsum(self.norms) / len(self.norms))
        return self.nu

    def rescale(self, requests: Sequence[EditRequest], results: Sequence[TargetResult],
                v0: torch.Tensor) -> list[TargetResult]:
        """Each result with v* = v0 + δ rescaled to norm ν, so that its target is
        target_init − v0 + v*; raises :class:`EditFailed` when any ‖v*‖ exceeds skip_factor·ν."""
        if self.nu is None:
            raise RuntimeError("norm anchor ν was not prepared (Editor.prepare)")
        out = []
        for req, res, v in zip(requests, results, v0):
            v_star = v + res.delta
            norm = float(v_star.norm())
            if not norm <= self.skip_factor * self.nu:
                raise EditFailed(f"norm anchor: ‖v*‖ = {norm:.4g} > {self.skip_factor:g}·ν = "
                                 f"{self.skip_factor * self.nu:.4g} (case_id {req.case_id}); edit not applied")
            scaled = v_star * (self.nu / norm)
            info = {**res.info, "norm_anchor_nu": self.nu, "norm_anchor_vstar_norm": norm}
            out.append(TargetResult(res.target_init, scaled - v, info))
        return out
