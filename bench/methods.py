"""ROME and MEMIT on SmolLM2 with the paper's context templates (ROME 21, MEMIT 6): the v*/z
fast path (cached prefix, suffix-only replay of the blocks above the edit, logits only where
read, a step's requests in one pass) against the reference's full passes, on the first edit and
on a MEMIT step of ``--batch`` requests; then per-edit wall time with its breakdown.

``python -m bench.methods [--edits N] [--tokens N] [--batch N]``
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from editlab.cli import CONF_DIR, normalize_overrides
from editlab.compose import register_configs
from editlab.data import build_requests
from editlab.deltas import WeightWriter
from editlab.evaluate.rewrite import score_requests
from editlab.methods import EditorContext, build_editor
from editlab.models import load_model


def _cfg(method: str, tokens: int):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=normalize_overrides(
            ["model=smollm2-135m", f"method={method}", f"method.mom2_n_tokens={tokens}"]))


def _timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def compare(editor, lm, method: str, requests, label: str) -> None:
    """One step on ``requests`` with the reference's full passes, then with the fast path."""
    deltas, wall = {}, {}
    for fast in (False, True):
        editor.fast = fast
        deltas[fast], wall[fast] = _timed(editor.apply, lm, requests)
    n = len(requests)
    t_ref, t_fast = deltas[False].info["v_time_s"] * n, deltas[True].info["v_time_s"] * n
    # Element-wise, rtol 1e-4 with an absolute floor at 1e-4 of the matrix's largest entry: 20 Adam
    # steps carry float32 rounding of a different summation order into entries near zero.
    ref, got = deltas[False].params, deltas[True].params
    same = all(torch.allclose(got[k], ref[k], rtol=1e-4, atol=1e-4 * float(ref[k].abs().max())) for k in got)
    worst = max(float((got[k] - ref[k]).norm() / ref[k].norm()) for k in got)
    print(f"[{method}]{label} v*/z loop: reference {t_ref:.2f}s, fast {t_fast:.2f}s, "
          f"speed-up {t_ref / t_fast:.2f}x, deltas allclose: {same} (relative difference {worst:.1e})")
    print(f"[{method}]{label} whole step: reference {wall[False]:.2f}s, fast {wall[True]:.2f}s, "
          f"speed-up {wall[False] / wall[True]:.2f}x")
    if not same:
        raise SystemExit(f"{method}: fast path changed the delta (relative difference {worst:.1e})")


def bench_method(method: str, n_edits: int, tokens: int, batch: int) -> None:
    cfg = _cfg(method, tokens)
    cache = Path(cfg.cache_dir).expanduser()
    lm = load_model(cfg.model, cache)
    editor = build_editor(cfg.method, cfg.model.name, EditorContext(cache, Path(cfg.data.root), cfg.seed))
    requests = build_requests(cfg.data, cfg.sample)[:max(n_edits, batch)]
    _, t_prep = _timed(editor.prepare, lm, requests)
    print(f"[{method}] prepare (templates + key statistics, {tokens} tokens, cached after first run): {t_prep:.1f}s")

    # Fast vs reference on the same first edit: same delta, optimisation-loop speed-up.
    # (Delta.info["v_time_s"] is the v*/z optimisation's own wall time, per request.)
    compare(editor, lm, method, requests[:1], "")
    if method == "memit" and batch > 1:
        compare(editor, lm, method, requests[:batch], f" batch of {batch}:")

    # Sequential stream with the fast path: per-edit breakdown.
    editor.fast = True
    weights = WeightWriter(lm.model)
    rows = []
    for r in requests[:n_edits]:
        delta, t_edit = _timed(editor.apply, lm, [r])
        _, t_apply = _timed(weights.apply, delta)
        scores, t_eval = _timed(score_requests, lm.model, lm.tok, [r])
        rows.append((t_edit, delta.info["v_time_s"], t_apply, t_eval, scores[0]["es"]))
    n = len(rows)
    mean = [sum(x[i] for x in rows) / n for i in range(5)]
    print(f"[{method}] {n} sequential edits: {mean[0]:.2f}s/edit = v*/z {mean[1]:.2f}s + keys & solve "
          f"{mean[0] - mean[1]:.2f}s; apply {mean[2] * 1e3:.1f}ms; evaluation {mean[3]:.2f}s; ES {mean[4]:.2f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench methods")
    p.add_argument("--edits", type=int, default=5)
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--methods", default="rome,memit")
    p.add_argument("--batch", type=int, default=10, help="MEMIT requests in one step (0 = skip)")
    args = p.parse_args(argv if argv is not None else [])
    os.environ.setdefault("EDITLAB_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    register_configs()
    for m in args.methods.split(","):
        bench_method(m, args.edits, args.tokens, args.batch)


if __name__ == "__main__":
    main(sys.argv[1:])
