"""Deltas of a fixed 5-edit tiny-model stream per method: a fingerprint for refactors.

    python -m bench.fingerprint [--out DIR] [--against DIR]

Runs every registered method on ``tiny-gpt2`` and ``tiny-llama`` (sample 1, 5 edits, seed 0, no evaluation),
and prints the SHA-256 of what each run leaves behind: the cumulative weight deltas and the
editor's tensor state (GRACE's codebook, AlphaEdit's and ENCORE's past keys, ...), in name order.
``--out`` keeps the deltas; ``--against`` compares a new run with kept ones to 1e-7 (max absolute
difference), for refactors that may reorder float operations without changing behaviour.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from editlab.checkpoint import committed_checkpoints, read_checkpoint
from editlab.methods import METHODS

MODELS = ("tiny-gpt2", "tiny-llama")


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    from editlab.cli import CONF_DIR, normalize_overrides

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=normalize_overrides(list(overrides)))


def _mend_editor(model: str, work: Path, cache: Path) -> Path:
    from editlab.mend.train import main

    out = work / f"mend-{model}"
    assert main([f"model={model}", f"cache_dir={cache}", f"mend.out_dir={out}", "mend.rank=8",
                 "mend.steps=3", "mend.val_every=3", "mend.n_val=2", "seed=0"]) == 0
    return out


def stream_deltas(method: str, model: str, work: Path, cache: Path) -> dict[str, torch.Tensor]:
    from editlab.run import run

    extra = [f"method.editor_path={_mend_editor(model, work, cache)}"] if method == "mend" else []
    cfg = _compose(f"model={model}", f"method={method}", "sample=1", "sample.n_edits=5", "seed=0",
                   "eval=none", "tracker=none", f"cache_dir={cache}", *extra)
    run_dir = work / f"{method}-{model}"
    run(cfg, run_dir)
    ckpt = read_checkpoint(committed_checkpoints(run_dir / "checkpoints")[-1][1])
    assert ckpt.edit == 5, f"{run_dir}: last checkpoint is of edit {ckpt.edit}"
    editor = load_file(ckpt.path / "state.safetensors")
    return {**{f"delta/{k}": v for k, v in ckpt.deltas.items()},
            **{k: v for k, v in editor.items() if k.startswith("editor")}}


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--against", type=Path)
    p.add_argument("--methods", nargs="*", default=sorted(METHODS))
    args = p.parse_args(argv)
    from editlab.compose import register_configs

    register_configs()
    torch.use_deterministic_algorithms(True)
    cache = Path(os.environ.get("EDITLAB_CACHE", Path.home() / ".cache" / "editlab"))
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            for method in args.methods:
                deltas = stream_deltas(method, model, Path(tmp), cache)
                line = f"{method:10s} {model:11s} {len(deltas):3d} tensors  sha256 {digest(deltas)}"
                name = f"{method}-{model}.safetensors"
                if args.out:
                    args.out.mkdir(parents=True, exist_ok=True)
                    save_file(deltas, args.out / name)
                if args.against:
                    old = load_file(args.against / name)
                    assert old.keys() == deltas.keys(), f"{name}: different tensors"
                    diff = max((old[k].double() - deltas[k].double()).abs().max().item() for k in old)
                    worst = max(worst, diff)
                    line += f"  max |difference| {diff:.1e}"
                print(line, flush=True)
    if args.against:
        print(f"largest difference {worst:.1e}: {'same' if worst <= 1e-7 else 'DIFFERENT'} to 1e-7")
        return 0 if worst <= 1e-7 else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
