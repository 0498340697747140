"""Every editor on SmolLM2: per-edit wall time of a short sequential stream, with efficacy.

``python -m bench editors [--edits N] [--methods a,b] [--tokens N] [--templates JSON]``

One model load for all methods; each method starts from the unedited weights.  MEND is left out
(it needs a network trained by ``editlab train-mend``).  ``--tokens`` sets the key statistics'
size for the methods that use them (cached under the cache dir after the first run);
``--templates`` overrides the context templates of the z/v* methods (default: each method's own).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from editlab.cli import CONF_DIR, normalize_overrides
from editlab.compose import register_configs
from editlab.data import build_requests
from editlab.deltas import WeightWriter
from editlab.evaluate.rewrite import score_requests
from editlab.methods import METHODS, EditorContext, build_editor
from editlab.models import load_model

DEFAULT_METHODS = "ft,rome,memit,emmet,alphaedit,encore,grace,locft_bf"


def _cfg(method: str, extra: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=normalize_overrides(["model=smollm2-135m", f"method={method}", *extra]))


def bench_method(lm, method: str, n_edits: int, tokens: int, templates: str | None) -> None:
    fields = {f.name for f in dataclasses.fields(METHODS[method].Hparams)}
    extra = [f"method.mom2_n_tokens={tokens}"] if "mom2_n_tokens" in fields else []
    if templates and "context_templates" in fields:
        extra.append(f"method.context_templates={templates}")
    cfg = _cfg(method, extra)
    editor = build_editor(cfg.method, cfg.model.name,
                          EditorContext(Path(cfg.cache_dir).expanduser(), Path(cfg.data.root), cfg.seed))
    requests = build_requests(cfg.data, cfg.sample)[:n_edits]
    t0 = time.perf_counter()
    editor.prepare(lm, requests)
    t_prep = time.perf_counter() - t0
    weights = WeightWriter(lm.model)
    times, es = [], []
    try:
        for r in requests:
            t0 = time.perf_counter()
            delta = editor.apply(lm, [r])
            times.append(time.perf_counter() - t0)
            weights.apply(delta)
            es.append(score_requests(lm.model, lm.tok, [r], neighborhood=False)[0]["es"])
    finally:
        weights.reset()
        if hasattr(editor, "close"):
            editor.close()
    print(f"[{method}] {' '.join(extra) or 'defaults'}: prepare {t_prep:.1f}s; {len(times)} edits: "
          f"{sum(times) / len(times):.2f}s/edit (min {min(times):.2f}, max {max(times):.2f}); "
          f"ES right after each edit {sum(es) / len(es):.2f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench editors")
    p.add_argument("--edits", type=int, default=2)
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--tokens", type=int, default=20_000)
    p.add_argument("--templates", default=None, help="e.g. '[[5,2]]'")
    args = p.parse_args(argv if argv is not None else [])
    os.environ.setdefault("EDITLAB_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    register_configs()
    cfg = _cfg("ft", [])
    lm = load_model(cfg.model, Path(cfg.cache_dir).expanduser())
    for m in args.methods.split(","):
        bench_method(lm, m, args.edits, args.tokens, args.templates)


if __name__ == "__main__":
    main(sys.argv[1:])
