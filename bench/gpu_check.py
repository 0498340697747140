"""``make gpu-check``: a few edits of every method on SmolLM2 on CUDA, and on a model split across
CUDA and the CPU, compared with the same edits on the CPU.

``python -m bench.gpu_check [--edits N] [--methods a,b] [--tokens N] [--tol X] [--device DEV]``

Three copies of the model make the same edits from the same requests: all on the CPU (the
reference), all on ``--device``, and split: even layers on ``--device``; odd layers, embeddings,
final norm and head on the CPU, joined by accelerate's device hooks as ``device_map`` loading joins
GPUs.  The split is what a multi-GPU user runs: inputs go to another device than the edited
layers', every block boundary crosses devices and MEMIT's layers alternate; with one GPU the CPU
stands in for the second.  Without CUDA the check says so and exits 0 (CI has no GPU);
``--device cpu`` runs the whole comparison on the CPU alone (hooks included), to test the script.

Per method and copy, one line: the largest relative Frobenius difference from the CPU's of every
step's delta and of the editor's state (GRACE's codebook, AlphaEdit's and ENCORE's past keys), of
the key statistics C, and ES after each edit.  Context templates are sampled on every copy and
must match the CPU's; the editors then all use the CPU's, so the deltas compare the edits alone.

Tolerance (``--tol``, default 2e-2): TF32 is off, so float32 on CUDA and on the CPU differ only in
summation order.  The edits amplify rounding through their optimisers (v*/z, FT, GRACE: 20-100
Adam steps) and solves.  Measured on the CPU, 2 edits each, float32 against float64 (the rounding
of one float32 run; two float32 runs on different devices differ by about sqrt(2) times that):
EMMET 2.7e-3 (its n x n inner solve), FT 2.2e-4, ROME, MEMIT, AlphaEdit, ENCORE, LocFT-BF and
GRACE's codebook 2e-5 to 6e-5, key statistics 4e-7, ES identical.  A device bug, an edit computed
on the wrong layer or from the wrong inputs, changes a delta by O(1).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from editlab.cli import CONF_DIR, normalize_overrides
from editlab.compose import register_configs
from editlab.data import build_requests
from editlab.deltas import WeightWriter
from editlab.evaluate.rewrite import score_requests
from editlab.methods import METHODS, EditorContext, build_editor
from editlab.methods.templates import generate_templates
from editlab.models import load_model
from editlab.models.loading import LoadedModel

ALL_METHODS = ",".join(sorted(METHODS))
MEND_EDITOR = "outputs/mend/smollm2-135m"  # where `make mend-smollm2` writes it
TEMPLATES = "[[5,2]]"  # few context templates keep the reference copy on the CPU short


def split_across(lm: LoadedModel, device: torch.device) -> LoadedModel:
    """Even blocks on ``device``, everything else on the CPU, each module's inputs moved to it.

    Hooks placed by hand, not ``model.device_map``: a map's "cpu" entries are offloaded weights
    that still run on the GPU, so no map splits one GPU's work with the CPU's.
    """
    from accelerate.hooks import attach_align_device_hook_on_blocks

    cpu, model, path = torch.device("cpu"), lm.model, lm.table.spec.layers.split(".")
    placement = {f"{lm.table.spec.layers}.{i}": device if i % 2 == 0 else cpu for i in range(lm.table.n_layers)}
    # The blocks' siblings along the path to them: embeddings, rotary tables, final norm, head.
    for depth in range(len(path)):
        parent = ".".join(path[:depth])
        for name, _ in model.get_submodule(parent).named_children():
            full = f"{parent}.{name}" if parent else name
            if full != ".".join(path[:depth + 1]):
                placement[full] = cpu
    attach_align_device_hook_on_blocks(model, execution_device=placement)
    return lm


@dataclass
class Outcome:
    """What one copy's edits produced, on the CPU for comparison."""

    deltas: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per step
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # editor state, flattened
    stats: dict[int, torch.Tensor] = field(default_factory=dict)  # key statistics C per layer
    es: list[float] = field(default_factory=list)
    templates: list[list[str]] | None = None  # as this copy sampled them
    seconds: float = 0.0


def _flat_tensors(obj: Any, at: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {at: obj.detach().float().cpu()}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, x in items for k, v in _flat_tensors(x, f"{at}/{key}").items()}


def run_edits(lm: LoadedModel, cfg, requests, cache_dir: Path, templates=None) -> Outcome:
    """``cfg.method``'s edits of ``requests`` one at a time from the unedited model, which is
    restored afterwards; ``templates`` replace the context templates the editor would sample."""
    editor = build_editor(cfg.method, cfg.model.name, EditorContext(cache_dir, Path(cfg.data.root), cfg.seed))
    out = Outcome()
    if hasattr(editor, "templates"):
        out.templates = generate_templates(lm.model, lm.tok, editor.hp.context_templates, seed=cfg.seed)
        editor.templates = templates or out.templates
    weights = WeightWriter(lm.model)
    t0 = time.perf_counter()
    try:
        editor.prepare(lm, requests)
        for r in requests:
            delta = editor.apply(lm, [r])
            weights.apply(delta)
            out.deltas.append({n: d.detach().float().cpu() for n, d in delta.params.items()})
            out.es.append(score_requests(lm.model, lm.tok, [r], paraphrase=False, neighborhood=False)[0]["es"])
        out.state = _flat_tensors(editor.state_dict())
        if getattr(editor, "uses_stats", False):
            out.stats = {l: m.float().cpu() for l, m in editor.stats.moments.items()}
    finally:
        weights.reset()
        if hasattr(editor, "close"):
            editor.close()
    out.seconds = time.perf_counter() - t0
    return out


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (‖a‖ when b is zero)."""
    if a.shape != b.shape:
        return float("inf")
    scale = float(b.norm()) or float(a.norm()) or 1.0
    return float((a - b).norm()) / scale


def compare(got: Outcome, ref: Outcome) -> dict[str, float]:
    """Largest relative differences of ``got`` from ``ref``; inf where something is missing."""
    def worst(mine: dict, theirs: dict) -> float:
        if set(mine) != set(theirs):
            return float("inf")
        return max((rel_diff(mine[k], theirs[k]) for k in theirs), default=0.0)

    steps = [worst(g, r) for g, r in zip(got.deltas, ref.deltas)]
    delta = max(steps, default=0.0) if len(got.deltas) == len(ref.deltas) else float("inf")
    return {"delta": delta, "state": worst(got.state, ref.state), "C": worst(got.stats, ref.stats)}


def _cfg(method: str, extra: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=normalize_overrides(["model=smollm2-135m", f"method={method}", *extra]))


def method_overrides(method: str, tokens: int, mend_editor: Path) -> list[str]:
    fields = {f.name for f in dataclasses.fields(METHODS[method].Hparams)}
    extra = [f"method.mom2_n_tokens={tokens}"] if "mom2_n_tokens" in fields else []
    if "context_templates" in fields:
        extra.append(f"method.context_templates={TEMPLATES}")
    if method == "mend":
        extra.append(f"method.editor_path={mend_editor}")
    return extra


def load_copies(device: torch.device) -> dict[str, LoadedModel]:
    cfg = _cfg("ft", [])
    cache = Path(cfg.cache_dir).expanduser()

    def load(where: str) -> LoadedModel:
        cfg.model.device = where
        return load_model(cfg.model, cache, seed=cfg.seed)

    return {"cpu": load("cpu"), f"all-{device}": load(str(device)), "split": split_across(load("cpu"), device)}


def check_method(method: str, copies: dict[str, LoadedModel], args, caches: dict[str, Path]) -> list[str]:
    """Runs one method on every copy, prints a line per copy; returns what failed."""
    cfg = _cfg(method, method_overrides(method, args.tokens, args.mend_editor))
    requests = build_requests(cfg.data, cfg.sample)[:args.edits]
    ref = run_edits(copies["cpu"], cfg, requests, caches["cpu"])
    failures = []
    for name, lm in copies.items():
        if name == "cpu":
            continue
        try:
            got = run_edits(lm, cfg, requests, caches[name], templates=ref.templates)
        except Exception as e:  # report it and go on: one run of this check should show every failure
            print(f"[{method}] {name}: error {type(e).__name__}: {e}", flush=True)
            failures.append(f"{method} on {name}: {type(e).__name__}")
            continue
        diffs = compare(got, ref)
        bad = [k for k, v in diffs.items() if not v <= args.tol]
        if got.templates != ref.templates:
            bad.append("templates")
        if got.es != ref.es:
            bad.append("ES")
        es = lambda o: "/".join(f"{x:.0f}" for x in o.es)  # noqa: E731
        print(f"[{method}] {name}: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
              + f"; ES {es(got)} (cpu {es(ref)}); {got.seconds:.1f}s (cpu {ref.seconds:.1f}s): "
              + ("ok" if not bad else "MISMATCH " + ",".join(bad)), flush=True)
        failures += [f"{method} on {name}: {b}" for b in bad]
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench gpu_check")
    p.add_argument("--edits", type=int, default=2)
    p.add_argument("--methods", default=ALL_METHODS)
    p.add_argument("--tokens", type=int, default=20_000, help="key statistics' size")
    p.add_argument("--tol", type=float, default=2e-2, help="largest relative difference from the CPU")
    p.add_argument("--device", default="cuda", help="the device compared with the CPU")
    p.add_argument("--mend-editor", type=Path, default=Path(MEND_EDITOR))
    args = p.parse_args(argv if argv is not None else [])
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu-check: CUDA is not available on this machine; nothing was compared "
              "(run `make gpu-check` where a GPU is)")
        return 0
    # Exact float32 on the GPU too, so that CPU and GPU differ only in summation order.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    os.environ.setdefault("EDITLAB_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    register_configs()
    methods = args.methods.split(",")
    if "mend" in methods and not (args.mend_editor / "editor.safetensors").exists():
        print(f"[mend] skipped: no trained editor in {args.mend_editor} (`make mend-smollm2` trains one)")
        methods.remove("mend")
    copies = load_copies(device)
    failures = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        # Key statistics are computed on each copy's own devices (and shared by its methods).
        caches = {name: Path(tmp) / name for name in copies}
        for m in methods:
            failures += check_method(m, copies, args, caches)
    if failures:
        print(f"gpu-check: FAILED ({len(failures)}): " + "; ".join(failures))
        return 1
    print(f"gpu-check: {len(methods)} methods agree with the CPU on {args.device} and split "
          f"(relative difference <= {args.tol:g}, same ES)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
