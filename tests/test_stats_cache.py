"""Key statistics shared by concurrent jobs: one computes, the others wait and load."""
from __future__ import annotations

import logging
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from conftest import compose
from omegaconf import OmegaConf

N_JOBS = 3


def slow_texts():
    """Slow enough that every job arrives while the first one is still computing."""
    for i in range(40):
        time.sleep(0.2)
        yield f"The statistics of sentence {i} are shared by all the jobs of a sweep."


def job(model_cfg, cache: Path, start):
    """One job of a sweep (its own process): reports whether it computed, whether it waited, and
    the statistic it ended up with."""
    from editlab.methods.stats import KeyStatistics
    from editlab.models import load_model

    waited = []
    handler = logging.Handler()
    handler.emit = lambda r: waited.append("waiting" in r.getMessage())
    logging.getLogger("editlab.methods.stats").addHandler(handler)
    logging.getLogger("editlab.methods.stats").setLevel(logging.INFO)
    lm = load_model(OmegaConf.create(model_cfg), cache)
    computed = []

    def texts():
        computed.append(True)
        return slow_texts()

    start.wait(timeout=300)
    stats = KeyStatistics(cache, "synthetic")
    stats.ensure(lm, [1], 400, 32, "float32", texts)
    return bool(computed), any(waited), stats.mom2(1)


def test_concurrent_jobs_compute_once_and_share(tmp_path):
    ctx = mp.get_context("spawn")
    model_cfg = OmegaConf.to_container(compose("model=tiny-gpt2").model, resolve=True)
    with ctx.Manager() as manager, ProcessPoolExecutor(N_JOBS, mp_context=ctx) as pool:
        start = manager.Barrier(N_JOBS)  # also makes each job run in a process of its own
        results = list(pool.map(job, [model_cfg] * N_JOBS, [tmp_path] * N_JOBS, [start] * N_JOBS))

    computed = [c for c, _, _ in results]
    assert sorted(computed) == [False] * (N_JOBS - 1) + [True]
    assert all(waited for c, waited, _ in results if not c)  # the others waited, and said so
    assert all(torch.equal(results[0][2], m) for _, _, m in results[1:])
    files = sorted(p.name for p in (tmp_path / "stats").iterdir())
    assert len(files) == 2 and files[0].endswith(".safetensors") and files[1] == files[0] + ".lock"
