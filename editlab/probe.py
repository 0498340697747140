"""``editlab probe run_dir=DIR at=[N,...] [n=K] [tasks=[...]] [prompts=[...]] [tokens=T] [out=FILE]``

Measures a run's model again at chosen edits, between its scheduled rounds: the downstream
few-shot F1 by generation and by label likelihood, the fraction of generated answers that are no
label word, and greedy continuations of free prompts.  A long stream takes downstream rounds
sparsely (every 500 edits); a breakdown (``editlab.results.breakdown``) is then known only to
within two rounds, and this places it.

The model at edit N is rebuilt from the run's checkpoints and ledger, as ``editlab export`` does,
and measured exactly as the run's own rounds are (its tasks, examples, batch size and answer
length, unless ``tasks``/``n`` say otherwise); at a round the run took, the numbers are the run's.
The run dir is only read, so a running stream can be probed.  ``data_root``, ``device`` and
``cache_dir`` default to the run's own.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from editlab.args import parse_args
from editlab.export import ExportError, cumulative_at, load_base_model

log = logging.getLogger(__name__)

USAGE = ("editlab probe run_dir=DIR at=[N,...] [n=K] [tasks=[sst2,...]] [prompts=[...]] [tokens=T] "
         "[data_root=DIR] [device=D] [cache_dir=DIR] [out=FILE]")
ARGS = {"run_dir": None, "at": [], "n": 0, "tasks": [], "prompts": [], "tokens": 10, "data_root": None,
        "device": None, "cache_dir": None, "out": None}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def probe(run_dir: str | Path, at: list[int], n: int = 0, tasks: list[str] = (), prompts: list[str] = (),
          tokens: int = 10, data_root: str | None = None, device: str | None = None,
          cache_dir: str | None = None) -> list[dict[str, Any]]:
    """One record per edit in ``at``: the downstream scores (the run's metric keys) plus
    ``downstream/mean_invalid`` and, per prompt, ``continuations``."""
    from editlab.deltas import WeightWriter
    from editlab.evaluate.downstream import DownstreamEval

    if not at:
        raise ExportError("at=[N,...]: name the edits to probe")
    edits = [int(a) for a in at]
    deltas = [cumulative_at(run_dir, e) for e in edits]  # every edit is checked before the model loads
    lm, config = load_base_model(run_dir, deltas[0][1]["model_id"], device, cache_dir)
    ev = config["eval"]
    glue_dir = Path(data_root or config["data"]["root"]).expanduser() / config["data"]["glue"]
    names = list(tasks) or list(ev["downstream_tasks"])
    downstream = DownstreamEval.from_dir(
        lm, glue_dir, names, n or ev["downstream_n"], batch_size=ev["batch_size"], gen_tokens=ev["generate_tokens"],
        generate=ev["downstream_generate"], likelihood=ev["downstream_likelihood"]) if names else None
    writer = WeightWriter(lm.model)
    records = []
    for edit, (cum, _) in zip(edits, deltas):
        writer.reset()
        writer.restore(cum)
        rec: dict[str, Any] = {"edit": edit}
        if downstream is not None:
            rec.update(downstream.round())
            rec["downstream/mean_invalid"] = _mean([v for k, v in rec.items() if k.endswith("/invalid")])
        rec["continuations"] = {p: _continue(lm, p, tokens) for p in prompts}
        records.append(rec)
        log.info("probed edit %d", edit)
    return records


@torch.no_grad()
def _continue(lm, prompt: str, tokens: int) -> str:
    enc = lm.tok(prompt, return_tensors="pt").to(lm.device)
    out = lm.model.generate(**enc, max_new_tokens=tokens, do_sample=False, pad_token_id=lm.tok.pad_token_id)
    return lm.tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)


def _cell(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


def markdown(records: list[dict[str, Any]]) -> str:
    lines = ["| edit | F1 (generation) | F1 (label likelihood) | answers that are no label word |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {r['edit']:,} | {_cell(r.get('downstream/mean_f1_gen'))} | {_cell(r.get('downstream/mean_f1_lik'))} "
              f"| {_cell(r.get('downstream/mean_invalid'))} |" for r in records]
    for r in records:
        lines += [f"edit {r['edit']:,}: {p!r} -> {text!r}" for p, text in r["continuations"].items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    try:
        args = parse_args(argv, ARGS, required=("run_dir", "at"), usage=USAGE)
        out = args.pop("out")
        try:
            args["at"] = [int(a) for a in args["at"]]
        except ValueError as e:
            raise ExportError(f"at={args['at']}: edits are integers") from e
        records = probe(**args)
    except (ExportError, ValueError, FileNotFoundError) as e:
        print(f"editlab probe: {e}", file=sys.stderr)
        return 2
    if out:
        Path(out).write_text(json.dumps({"run_dir": str(args["run_dir"]), "records": records}, indent=2))
    print(markdown(records))
    return 0
