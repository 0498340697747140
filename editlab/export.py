"""``editlab export run_dir=DIR at_edit=N [undo=[i,j]] [format=delta|model] out=PATH``

Writes the model of a run after edit ``N`` (default: its newest checkpoint), either as a
cumulative-delta safetensors file (``format=delta``, the format of a checkpoint's
``deltas.safetensors``: parameter name -> float32 ``W - W0``) or as a full ``save_pretrained``
directory with the tokenizer (``format=model``; optional ``device=`` and ``cache_dir=``).

The delta at ``N`` starts from the newest kept checkpoint at or before ``N``, which is bit-exact,
and adds the ledger's recorded steps after it.  Steps of methods that return low-rank factors are
always recorded; dense-only methods (FT-C) only with ``checkpoint.dense_ledger=true``, otherwise
such a run exports only at its kept checkpoints.

``undo`` subtracts the recorded deltas of the chosen edits (all edits of a batched step
together).  As weight arithmetic this is exact: the result is ``W0 + sum of the other edits'
deltas``.  It is only an approximation of the model a stream *without* those edits would have
produced, because every later edit was computed on weights that contained them (ROME/MEMIT keys,
values and covariance-weighted solves; FT-C's gradients and its clamp around the then-current
weights).  The two coincide only for edits that do not interact.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from editlab.args import parse_args
from editlab.checkpoint import DELTA_FORMAT, committed_checkpoints, read_checkpoint
from editlab.journal import read_steps

log = logging.getLogger(__name__)

USAGE = "editlab export run_dir=DIR [at_edit=N] [undo=[i,j]] [format=delta|model] [device=D] [cache_dir=DIR] out=PATH"
ARGS = {"run_dir": None, "out": None, "at_edit": None, "undo": [], "format": "delta", "device": None,
        "cache_dir": None}


class ExportError(ValueError):
    pass


def _step_spans(applied: list, failed: list[dict]) -> list[tuple[int, int, str | None]]:
    """(first, last, failure reason or None) of every step, ordered."""
    spans = [(s.first, s.last, None) for s in applied]
    spans += [(f["edit"] - len(f["case_ids"]) + 1, f["edit"], f["reason"]) for f in failed]
    return sorted(spans)


def cumulative_at(run_dir: str | Path, at_edit: int | None = None, undo=()) -> tuple[dict[str, torch.Tensor], dict]:
    """The cumulative delta after edit ``at_edit`` without the ``undo`` edits, and its provenance."""
    run_dir = Path(run_dir)
    ckpts = committed_checkpoints(run_dir / "checkpoints")
    if not ckpts:
        raise ExportError(f"{run_dir} holds no committed checkpoint")
    latest = read_checkpoint(ckpts[-1][1])
    n = latest.edit if at_edit is None else int(at_edit)
    if not 0 <= n <= latest.edit:
        raise ExportError(f"at_edit={n}: {run_dir} is committed up to edit {latest.edit}")
    undo = sorted({int(i) for i in undo})
    if any(not 1 <= i <= n for i in undo):
        raise ExportError(f"undo={undo}: edits must lie in 1..{n}")
    base_edit, base_path = max(((e, p) for e, p in ckpts if e <= n), default=(0, None), key=lambda x: x[0])
    meta = {"at_edit": n, "undo": undo, "model_id": latest.state["model_id"],
            "config_hash": latest.state["config_hash"], "from_checkpoint": base_edit, "run_dir": str(run_dir)}
    cum = {} if base_path is None else {k: v.clone() for k, v in read_checkpoint(base_path).deltas.items()}
    if base_edit == n and not undo:
        return cum, meta

    # Everything else comes from the ledger, read one shard at a time; it must cover every step up to n.
    applied = []
    for s in read_steps(run_dir / "ledger", upto=n):
        applied.append(s)
        undone = any(s.first <= i <= s.last for i in undo)
        if (s.last <= base_edit) != undone:  # already in the base and kept, or after it and dropped
            s.tensors = {}
            continue
        if not s.recorded:
            raise ExportError(f"edits {s.first}..{s.last} have no recorded delta ({s.kinds}): this method returns "
                              "no factors and the run had checkpoint.dense_ledger=false; it exports only at "
                              f"its kept checkpoints {[e for e, _ in ckpts]}")
        sign = -1.0 if undone else 1.0
        for name in s.kinds:
            d = s.delta(name)
            cum[name] = cum[name] + sign * d if name in cum else sign * d
        s.tensors = {}
    spans = _step_spans(applied, [f for f in latest.state["stream"]["failed"] if f["edit"] <= n])
    expected = 1
    for first, last, _ in spans:
        if first != expected:
            raise ExportError(f"{run_dir}/ledger has no record of edits {expected}..{first - 1}; the run "
                              f"exports only at its kept checkpoints {[e for e, _ in ckpts]}")
        expected = last + 1
    if expected != n + 1:
        raise ExportError(f"at_edit={n} is not a step boundary in the ledger of {run_dir} (it covers edits up "
                          f"to {expected - 1}; kept checkpoints: {[e for e, _ in ckpts]})")
    for first, last, reason in spans:
        chosen = [i for i in undo if first <= i <= last]
        if chosen and reason is not None:
            log.warning("undo: edits %d..%d failed and were never applied (%s)", first, last, reason)
        elif chosen and len(chosen) != last - first + 1:
            raise ExportError(f"undo={undo}: edits {first}..{last} were applied as one step; undo all of them or none")
    if undo:
        log.warning("undo removes the chosen edits' own deltas exactly; later edits were computed on a model "
                    "that contained them, so this approximates a stream without them")
    return cum, meta


def load_base_model(run_dir: str | Path, model_id: str, device: str | None = None,
                    cache_dir: str | None = None) -> tuple[Any, dict]:
    """The unedited model a run edited, loaded from its ``config.json``, and that config; an
    :class:`ExportError` when it is not the model its checkpoints were written over."""
    from editlab.models import load_model

    config = json.loads((Path(run_dir) / "config.json").read_text())
    model_cfg = OmegaConf.create(config["model"])
    if device:
        model_cfg.device = device
    lm = load_model(model_cfg, cache_dir or config["cache_dir"], seed=config["seed"])
    if lm.model_id != model_id:
        raise ExportError(f"{run_dir}/config.json loads base model {lm.model_id!r} but the checkpoints were "
                          f"written over {model_id!r}")
    return lm, config


def export(run_dir: str | Path, out: str | Path, at_edit: int | None = None, undo=(), format: str = "delta",
           device: str | None = None, cache_dir: str | None = None) -> Path:
    if format not in ("delta", "model"):
        raise ExportError(f"format must be delta or model, got {format!r}")
    cum, meta = cumulative_at(run_dir, at_edit, undo)
    out = Path(out)
    if format == "delta":
        out.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.to(torch.float32).contiguous() for k, v in cum.items()}
        save_file(tensors, str(out), metadata={"format": DELTA_FORMAT, "edit": str(meta["at_edit"]),
                                                **{k: json.dumps(v) if not isinstance(v, str) else v
                                                   for k, v in meta.items()}})
        return out

    from editlab.deltas import WeightWriter

    lm, _ = load_base_model(run_dir, meta["model_id"], device, cache_dir)
    WeightWriter(lm.model).restore(cum)
    out.mkdir(parents=True, exist_ok=True)
    lm.model.save_pretrained(out, safe_serialization=True)
    lm.tok.save_pretrained(out)
    (out / "editlab_export.json").write_text(json.dumps(meta, indent=2))
    return out


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    try:
        path = export(**parse_args(argv, ARGS, required=("run_dir", "out"), usage=USAGE))
    except (ExportError, ValueError, FileNotFoundError) as e:
        print(f"editlab export: {e}", file=sys.stderr)
        return 2
    print(f"editlab export: wrote {path}")
    return 0
