"""Second moments C = E[k kᵀ] of the inputs k of MLP output projections.

An artifact of its own: computed once per (model id, layer, corpus, n_tokens, max_len, dtype) on
the unedited model, saved as safetensors with that key in its metadata, and loaded on later runs.
Jobs that share a cache (the SLURM array of a sweep) compute each statistic once: the first takes
a lock beside the file and computes it, the others wait on that lock and then load the file.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from editlab.methods.tracing import StopForward, trace
from editlab.models.loading import DTYPES, LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatsKey:
    model_id: str
    layer: int
    module: str
    corpus: str
    n_tokens: int
    max_len: int
    dtype: str

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


class KeyStatistics:
    """Loads or computes second moments; holds the ones this editor uses (no global cache)."""

    def __init__(self, cache_dir: Path, corpus: str, texts: Iterable[str] | None = None):
        self.dir = Path(cache_dir) / "stats"
        self.corpus = corpus
        self.texts = texts  # a factory's output; only consumed when something must be computed
        self.moments: dict[int, torch.Tensor] = {}

    def path(self, key: StatsKey) -> Path:
        safe = key.model_id.replace("/", "--").replace(":", "-")
        name = f"{safe}-L{key.layer}-{key.corpus}-{key.n_tokens}-{key.max_len}-{key.dtype}-{key.digest()}"
        return self.dir / f"{name}.safetensors"

    def ensure(self, lm: LoadedModel, layers: list[int], n_tokens: int, max_len: int, dtype: str,
               texts_factory) -> None:
        """Make ``self.moments[layer]`` available for every layer, computing what is missing."""
        keys = {l: StatsKey(lm.model_id, l, lm.table.mlp_out_name(l), self.corpus, n_tokens, max_len, dtype)
                for l in layers}
        missing = self._load(keys)
        if not missing:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with ExitStack() as locks:
            # Locked in one order (by file name) by every job, so no two jobs wait on each other.
            for path in sorted((self.path(keys[l]) for l in missing), key=lambda p: p.name):
                locks.enter_context(file_lock(path))
            missing = self._load({l: keys[l] for l in missing})  # what another job saved meanwhile
            if not missing:
                return
            computed = compute_second_moments(lm, missing, texts_factory(), n_tokens, max_len, DTYPES[dtype])
            for layer, mom2 in computed.items():
                p = self.path(keys[layer])
                meta = {k: str(v) for k, v in asdict(keys[layer]).items()}
                save_atomic({"mom2": mom2.contiguous()}, p, meta)
                log.info("saved key statistics %s", p)
                self.moments[layer] = mom2

    def _load(self, keys: dict[int, StatsKey]) -> list[int]:
        """Load the statistics on disk; returns the layers that are not."""
        missing = []
        for layer, key in keys.items():
            p = self.path(key)
            if p.exists():
                self.moments[layer] = load_file(p)["mom2"]
            else:
                missing.append(layer)
        return missing

    def mom2(self, layer: int, device=None) -> torch.Tensor:
        if layer not in self.moments:
            raise RuntimeError(f"key statistics for layer {layer} were not prepared (Editor.prepare)")
        return self.moments[layer].to(device) if device is not None else self.moments[layer]


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<path>.lock`` while the block runs; log when it must wait.

    The kernel drops the lock when its holder exits, killed or not, so a dead job never blocks
    the others.  On NFS, Linux maps ``flock`` to POSIX locks (lockd or NFSv4).  Where the file
    system refuses locks, jobs go on unlocked: the atomic writes keep the cache whole, jobs may
    only compute the same statistic twice.  The lock file stays: removing it would let a waiting
    job and a newly arrived one lock two different files.
    """
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a") as f:  # writable: NFS grants exclusive POSIX locks to writers only
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another job computing %s", path)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            log.warning("cannot lock %s (%s); computing without a lock", lock, e)
        yield  # closing the file releases the lock


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write through a temporary name of this writer's own, then rename into place, so readers
    see the whole file or none and concurrent writers never write into the same file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@torch.no_grad()
def compute_second_moments(lm: LoadedModel, layers: list[int], texts: Iterable[str], n_tokens: int,
                           max_len: int, dtype: torch.dtype, batch_size: int = 8) -> dict[int, torch.Tensor]:
    """E[k kᵀ] over the first ``n_tokens`` non-padding tokens of ``texts`` (accumulated in float64).

    The forward stops after the highest layer needed, so only the layers below it are paid for.
    """
    model, tok = lm.model, lm.tok
    names = {l: lm.table.mlp_out_name(l) for l in layers}
    top = lm.table.spec.layers + f".{max(layers)}"
    sums: dict[int, torch.Tensor] = {}
    count = 0
    bar = tqdm(total=n_tokens, desc=f"key stats L{layers}", unit="tok", disable=None)
    batch: list[str] = []
    it = iter(texts)
    with bar:
        while count < n_tokens:
            batch.clear()
            for text in it:
                batch.append(text)
                if len(batch) == batch_size:
                    break
            if not batch:
                raise ValueError(f"the statistics corpus ran out after {count} tokens (< {n_tokens})")
            enc = tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_len).to(lm.device)
            with trace(model, inputs=tuple(names.values()), stop_after=top) as got:
                try:
                    model(**enc, use_cache=False)
                except StopForward:
                    pass
            mask = enc.attention_mask.bool()
            take = min(int(mask.sum()), n_tokens - count)
            for l, name in names.items():
                x = got["in:" + name]  # on its layer's device, which the sums stay on
                k = x[mask.to(x.device)][:take].to(dtype).double()
                sums[l] = sums.get(l, 0) + k.T @ k
            count += take
            bar.update(take)
    return {l: (s / count).to(dtype).cpu() for l, s in sums.items()}
