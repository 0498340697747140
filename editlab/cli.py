"""``python -m editlab key=value ...`` (Hydra) and the ``editlab <command>`` subcommands."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from editlab.compose import normalize_overrides, register_configs
from editlab.config import CONF_DIR

log = logging.getLogger("editlab")


# launch/ (SLURM launcher configs, on Hydra's search path via EDITLAB_LAUNCH) sits beside conf/ in
# a checkout; defaulting to it lets jobs start from any working directory.
os.environ.setdefault("EDITLAB_LAUNCH", str(Path(CONF_DIR).resolve().parent / "launch"))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def run_main(cfg: DictConfig) -> None:
    from editlab.run import run

    run_dir = cfg.run_dir or HydraConfig.get().runtime.output_dir
    summary = run(cfg, run_dir)
    print(f"editlab: {summary.get('n_edits', 0)} edits done; results in {run_dir}")


# `editlab <command> key=value ...`: commands other than running a stream, each a module with
# a ``main(argv: list[str]) -> int`` taking Hydra-style key=value arguments.
SUBCOMMANDS = {
    "export": "editlab.export",  # a delta file or full model at an edit index (issue 5)
    "plot": "editlab.plots",  # local PNG figures + report.html from run dirs (issue 6)
    "report": "editlab.report",  # the paper's figures as a W&B report (issue 6)
    "train-mend": "editlab.mend.train",  # train a MEND editor network (issue 9)
    "compare": "editlab.compare",  # one table of many runs at the same edit (issue 8)
    "snapshot": "editlab.snapshot",  # finish a copy of a running stream at a checkpoint (issue 16)
    "probe": "editlab.probe",  # downstream scores and continuations at chosen edits of a run (issue 16)
}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        import importlib

        module = importlib.import_module(SUBCOMMANDS[sys.argv[1]])
        raise SystemExit(module.main(sys.argv[2:]))
    register_configs()
    sys.argv = [sys.argv[0], *normalize_overrides(sys.argv[1:])]
    run_main()


if __name__ == "__main__":
    main()
