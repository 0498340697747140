"""``editlab snapshot run_dir=DIR out=DIR [at_edit=N] [cache_dir=DIR]``

Finishes a copy of a run at one of its checkpoints, leaving the run itself alone.  A stream of
thousands of edits runs for days; its results so far (``summary.json``, ``forgetting.json``, the
figures) are only written when it ends.  This copies the run dir's ``config.json``,
``metrics.jsonl``, ledger and the chosen checkpoint (default: the newest) into ``out``, and runs
the copy with the run's own config ending at that edit: the resume rewinds ``metrics.jsonl`` to
the checkpoint, the stream has nothing left to edit, and the end of the run (the disabling
confirmation, summary, forgetting history, Table 3 and plots) is done as if the stream had been
asked for that many edits.  The copy is tracked locally (``tracker=none``) even when the run
streams to W&B, so that a snapshot never writes into the run's W&B history.

The source may be running: only files a checkpoint has committed are read, and a resume drops
whatever the copy caught of the steps after it.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf

from editlab.args import UsageError, parse_args
from editlab.checkpoint import committed_checkpoints

log = logging.getLogger(__name__)

USAGE = "editlab snapshot run_dir=DIR out=DIR [at_edit=N] [cache_dir=DIR]"
ARGS = {"run_dir": None, "out": None, "at_edit": -1, "cache_dir": None}


class SnapshotError(ValueError):
    """The run dir has no checkpoint to finish at, or ``out`` is not free."""


def copy_run(run_dir: Path, out: Path, at_edit: int = -1) -> int:
    """Copy what a resume at ``at_edit`` (-1: the newest checkpoint) reads into ``out``; its edit."""
    kept = committed_checkpoints(run_dir / "checkpoints")
    if not kept:
        raise SnapshotError(f"{run_dir} has no committed checkpoint (checkpoints/LATEST) to finish at")
    chosen = [(e, p) for e, p in kept if at_edit in (-1, e)]
    if not chosen:
        raise SnapshotError(f"{run_dir} keeps no checkpoint at edit {at_edit}; kept: {[e for e, _ in kept]}")
    edit, ckpt = chosen[-1]
    if out.exists() and any(out.iterdir()):
        raise SnapshotError(f"out={out} exists and is not empty; a snapshot writes into a fresh directory")
    # metrics.jsonl last: it only grows, so it then holds every line the checkpoint counts.
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copytree(ckpt, out / "checkpoints" / ckpt.name)
        (out / "checkpoints" / "LATEST").write_text(ckpt.name)
        if (run_dir / "ledger").is_dir():
            shutil.copytree(run_dir / "ledger", out / "ledger")
        for name in ("config.json", "metrics.jsonl"):
            shutil.copy2(run_dir / name, out / name)
    except FileNotFoundError as e:  # the running stream pruned the checkpoint while it was copied
        shutil.rmtree(out, ignore_errors=True)
        raise SnapshotError(f"{ckpt} went away while it was copied ({e}); run the snapshot again") from e
    return edit


def snapshot_config(run_dir: Path, out: Path, edit: int, cache_dir: str | None = None):
    """The run's resolved config, ending at ``edit``, run in ``out`` with local tracking."""
    resolved = json.loads((run_dir / "config.json").read_text())
    resolved.pop("hparams", None)  # derived from method + model when the run is built
    cfg = OmegaConf.create(resolved)
    cfg.sample.n_edits = edit
    cfg.run_dir = str(out)
    # The config differs from the checkpoint's in n_edits alone, which force accepts (with a warning).
    cfg.resume = "force"
    cfg.tracker.name = "none"
    if cache_dir:
        cfg.cache_dir = cache_dir
    return cfg


def snapshot(run_dir: str, out: str, at_edit: int = -1, cache_dir: str | None = None) -> dict:
    from editlab.run import run

    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.json").exists():
        raise SnapshotError(f"{run_dir} is not a run dir: it has no config.json")
    edit = copy_run(run_dir, out, at_edit)
    log.info("finishing a copy of %s at its checkpoint of edit %d in %s", run_dir, edit, out)
    return run(snapshot_config(run_dir, out, edit, cache_dir), out)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    try:
        args = parse_args(argv, ARGS, required=("run_dir", "out"), usage=USAGE)
        summary = snapshot(**args)
    except (UsageError, SnapshotError, FileNotFoundError) as e:
        print(f"editlab snapshot: {e}", file=sys.stderr)
        return 2
    print(f"editlab snapshot: {summary.get('n_edits', 0)} edits; results in {args['out']}")
    return 0
