"""Checkpoint size per 1000 edits, checkpoint write time and resume time (issue 5).

What is stored depends only on shapes, not values, so each stream applies synthetic deltas of a
method's shape through the real code path (WeightWriter -> DeltaJournal -> Checkpointer, every 50
edits, keep 2): ROME-shaped (one pair of vectors per edit, returned as factors) and FT-C-shaped
(one dense matrix per edit, no factors).  SmolLM2-135M is the real model (layer 10 down_proj,
576 x 1536); gpt2-xl is its edited matrix only (layer 17 c_proj, 6400 x 1600), enough to measure
what a checkpoint of it costs.  A dense FT-C ledger is linear in edits, so it is run for 100 edits
and scaled to 1000 (so is the gpt2-xl-sized ROME ledger, run for 250).  The baseline is the paper's
code: a full fp32 model copy every 20 edits.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from editlab.checkpoint import Checkpointer
from editlab.config import CheckpointConfig
from editlab.deltas import Delta, WeightWriter
from editlab.stream import StreamState

GPT2_XL_PARAMS = 1_557_611_200  # gpt2-xl, all parameters
EVERY = 50


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


class NoState:
    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class NoTracker:
    def log_checkpoint(self, path, edit):
        pass


def synthetic_delta(name: str, shape: tuple[int, int], kind: str, g: torch.Generator) -> Delta:
    if kind == "rome":
        a, b = torch.randn(shape[0], generator=g) * 1e-3, torch.randn(shape[1], generator=g)
        return Delta(params={name: torch.outer(a, b)}, factors={name: [(a, b)]})
    return Delta(params={name: torch.randn(shape, generator=g) * 1e-4})


def stream(model: nn.Module, name: str, kind: str, n: int, dense_ledger: bool, root: Path) -> dict:
    """n synthetic edits with a checkpoint every 50; sizes, mean write time, resume time."""
    shape = tuple(dict(model.named_parameters())[name].shape)
    cfg = CheckpointConfig(every=EVERY, keep=2, ledger=True, dense_ledger=dense_ledger)
    ckpts = Checkpointer(root, cfg, {"bench": kind}, model_id="bench")
    ckpts.start("auto")
    weights = WeightWriter(model, journal=ckpts.journal)
    s = SimpleNamespace(state=StreamState(), editor=NoState(), evaluator=NoState(), weights=weights,
                        tracker=NoTracker(), requests=[None] * n)
    g = torch.Generator().manual_seed(0)
    writes = []
    for i in range(1, n + 1):
        weights.apply(synthetic_delta(name, shape, kind, g), span=(i, i))
        s.state.n_done = i
        t0, before = time.perf_counter(), ckpts.last_edit
        ckpts.on_step(s)
        if ckpts.last_edit != before:
            writes.append(time.perf_counter() - t0)
    one_ckpt = du(root / "checkpoints" / f"ckpt-{n:07d}")
    ledger_bytes = du(root / "ledger")
    want = {k: v.clone() for k, v in weights.cumulative.items()}

    weights.reset()  # back to base weights, as a fresh process would find them
    t0 = time.perf_counter()
    again = Checkpointer(root, cfg, {"bench": kind}, model_id="bench")
    ck = again.start("auto")
    s2 = SimpleNamespace(state=StreamState(), editor=NoState(), evaluator=NoState(), weights=WeightWriter(model))
    again.restore(ck, s2)
    resume_s = time.perf_counter() - t0
    assert all(torch.equal(s2.weights.cumulative[k], want[k]) for k in want)
    s2.weights.reset()
    return {"one_ckpt_MB": one_ckpt / 1e6, "ledger_MB_per_1000": ledger_bytes / 1e6 * 1000 / n,
            "write_s": sum(writes) / len(writes), "resume_s": resume_s, "n": n}


def report(label: str, r: dict, full_copy_bytes: int) -> None:
    kept = 2 * r["one_ckpt_MB"]
    copies = 1000 // 20 * full_copy_bytes / 1e6
    print(f"{label:38s} checkpoint {r['one_ckpt_MB']:8.1f} MB (2 kept: {kept:8.1f})  ledger/1000 edits "
          f"{r['ledger_MB_per_1000']:9.1f} MB  write {r['write_s'] * 1e3:7.0f} ms  resume {r['resume_s'] * 1e3:6.0f} ms"
          f"  | full copies every 20 edits: {copies / 1e3:7.1f} GB per 1000 edits", flush=True)


def main() -> None:
    from hydra import compose, initialize_config_dir

    from editlab.cli import CONF_DIR
    from editlab.compose import register_configs
    from editlab.models import load_model

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=smollm2-135m", "model.device=cpu"])
    t0 = time.perf_counter()
    lm = load_model(cfg.model, Path(cfg.cache_dir).expanduser())
    load_s = time.perf_counter() - t0
    smol_name = lm.table.mlp_out_weight_name(10)
    smol_bytes = sum(p.numel() * 4 for p in lm.model.parameters())

    tmp = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    try:
        t0 = time.perf_counter()
        lm.model.save_pretrained(tmp / "full", safe_serialization=True)
        copy_s = time.perf_counter() - t0
        print(f"smollm2-135m: model load {load_s:.1f} s; one full fp32 copy {du(tmp / 'full') / 1e6:.0f} MB "
              f"written in {copy_s:.2f} s; edited matrix {smol_name} {tuple(lm.table.mlp_out_weight(10).shape)}")
        shutil.rmtree(tmp / "full")
        report("smollm2 ROME-shaped, 1000 edits", stream(lm.model, smol_name, "rome", 1000, False, tmp / "a"),
               smol_bytes)
        report("smollm2 FT-C, 1000 edits", stream(lm.model, smol_name, "ft", 1000, False, tmp / "b"), smol_bytes)
        report("smollm2 FT-C + dense ledger, 100 edits", stream(lm.model, smol_name, "ft", 100, True, tmp / "c"),
               smol_bytes)
        del lm
        xl = nn.Module()
        xl.c_proj = nn.Linear(1600, 6400, bias=False)  # weight 6400 x 1600, gpt2-xl c_proj's size
        xl.requires_grad_(False)
        name = "c_proj.weight"
        report("gpt2-xl c_proj ROME-shaped, 250 edits", stream(xl, name, "rome", 250, False, tmp / "d"),
               GPT2_XL_PARAMS * 4)
        report("gpt2-xl c_proj FT-C, 100 edits", stream(xl, name, "ft", 100, False, tmp / "e"), GPT2_XL_PARAMS * 4)
        print("gpt2-xl MEMIT (5 layers): checkpoint = 5 x the c_proj checkpoint; ledger = 5 layers x "
              "(6400 + 1600) x 4 B per edit")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
