"""Which layer should ROME edit in SmolLM2?  Efficacy, paraphrase and neighborhood of single
edits (each on the unedited model) per candidate layer.

``python -m bench rome_layers [--layers 2,4,...] [--edits N] [--tokens N]``
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from editlab.cli import CONF_DIR, normalize_overrides
from editlab.compose import register_configs
from editlab.data import build_requests
from editlab.data.text import corpus_texts
from editlab.deltas import WeightWriter
from editlab.evaluate.rewrite import score_requests
from editlab.methods import EditorContext, build_editor
from editlab.models import load_model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench rome_layers")
    p.add_argument("--layers", default="2,4,6,8,10,12,15")
    p.add_argument("--edits", type=int, default=5)
    p.add_argument("--tokens", type=int, default=20_000)
    p.add_argument("--templates", default="[[5,2],[10,2]]", help="context_templates (cheaper than the default)")
    args = p.parse_args(argv if argv is not None else [])
    register_configs()
    layers = [int(x) for x in args.layers.split(",")]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=normalize_overrides(
            ["model=smollm2-135m", "method=rome", f"method.mom2_n_tokens={args.tokens}",
             f"method.context_templates={args.templates}"]))
    cache = Path(cfg.cache_dir).expanduser()
    lm = load_model(cfg.model, cache)
    requests = build_requests(cfg.data, cfg.sample)[: args.edits]
    weights = WeightWriter(lm.model)
    print("layer  ES    PS    NS    NS(before)  s/edit")
    for layer in layers:
        cfg.method.layers = [layer]
        editor = build_editor(cfg.method, cfg.model.name, EditorContext(cache, Path(cfg.data.root), cfg.seed))
        # one pass computes the statistics of every candidate layer
        editor.stats.ensure(lm, layers, args.tokens, 128, "float32",
                            lambda: corpus_texts("wikitext", Path(cfg.data.root), cfg.data.wikitext))
        editor.prepare(lm, requests)
        before = score_requests(lm.model, lm.tok, requests)
        after, t0 = [], time.perf_counter()
        for r in requests:
            weights.apply(editor.apply(lm, [r]))
            after.append(score_requests(lm.model, lm.tok, [r])[0])
            weights.reset()
        dt = (time.perf_counter() - t0) / len(requests)
        mean = {k: sum(a[k] for a in after) / len(after) for k in ("es", "ps", "ns")}
        ns0 = sum(b["ns"] for b in before) / len(before)
        print(f"{layer:5d}  {mean['es']:.2f}  {mean['ps']:.2f}  {mean['ns']:.2f}  {ns0:.2f}        {dt:.1f}",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
