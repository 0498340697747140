"""A trained MEND editor on SmolLM2: single-edit scores on held-out records and edit time.

Each request of sample ``--sample``'s first ``--edits`` (never trained on: ``editlab train-mend``
excludes every record a sample order evaluates) is applied *alone* to the unedited model through
the editor and the WeightWriter, scored (ES/PS/NS, as the stream scores a new edit) and undone.

``python -m bench.mend [--editor DIR] [--edits N] [--sample K]``
(``python -m bench mend`` uses the defaults: the editor of ``make mend-smollm2``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from editlab.cli import CONF_DIR, normalize_overrides
from editlab.compose import register_configs
from editlab.data import build_requests
from editlab.deltas import WeightWriter
from editlab.evaluate.rewrite import score_requests
from editlab.methods import EditorContext, build_editor
from editlab.models import load_model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.mend")
    ap.add_argument("--editor", default="outputs/mend/smollm2-135m")
    ap.add_argument("--edits", type=int, default=50)
    ap.add_argument("--sample", type=int, default=1)
    args = ap.parse_args(argv or [])
    if not (Path(args.editor) / "editor.safetensors").exists():
        print(f"bench mend: no editor at {args.editor}; train one with `make mend-smollm2`", file=sys.stderr)
        return
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=normalize_overrides(
            ["model=smollm2-135m", "method=mend", f"method.editor_path={args.editor}", f"sample={args.sample}",
             f"sample.n_edits={args.edits}"]))
    ctx = EditorContext(Path(cfg.cache_dir).expanduser(), Path(cfg.data.root).expanduser(), cfg.seed)
    editor = build_editor(cfg.method, cfg.model.name, ctx)
    requests = build_requests(cfg.data, cfg.sample)
    lm = load_model(cfg.model, cfg.cache_dir)
    editor.prepare(lm, requests)
    weights = WeightWriter(lm.model)
    before = score_requests(lm.model, lm.tok, requests)
    after, times, norms = [], [], []
    for r in requests:
        t = time.perf_counter()
        delta = editor.apply(lm, [r])
        times.append(time.perf_counter() - t)
        norms.append(sum(float(d.norm()) ** 2 for d in delta.params.values()) ** 0.5)
        weights.apply(delta)
        after += score_requests(lm.model, lm.tok, [r])
        weights.reset()
    print(f"editor {editor.hp.editor_path} (sha256 {editor.hp.editor_sha256[:12]}), "
          f"sample {args.sample}, {len(requests)} single edits on the unedited model")
    for key in ("es", "ps", "ns"):
        b = statistics.mean(m[key] for m in before)
        a = statistics.mean(m[key] for m in after)
        print(f"  {key.upper()}: {b:.3f} unedited -> {a:.3f} after the edit")
    print(f"  edit time {statistics.mean(times):.2f} s (median {statistics.median(times):.2f}), "
          f"update norm (all layers) median {statistics.median(norms):.3g}")


if __name__ == "__main__":
    main(sys.argv[1:])
