"""Where metrics go: always a ``metrics.jsonl`` in the run dir, optionally Weights & Biases.

Every record carries ``edit`` (the number of edits applied so far), W&B's step metric, so a
resumed run continues its curves at the right x whatever W&B's own ``_step`` counter says.
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
import string
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)

# Metric namespaces; each becomes a W&B panel section plotted against ``edit``, as does a
# ``window<w>`` per configured ``eval.windows`` entry (see :func:`namespaces`).
NAMESPACES = ("edit", "forget", "downstream", "gen", "distance", "time", "method", "collapse")
RUN_ID_FILE = "wandb_run_id"


def namespaces(windows: Sequence[int]) -> tuple[str, ...]:
    """Every namespace a run logs, its windowed means named after the windows it was configured with."""
    return (*NAMESPACES, *(f"window{w}" for w in windows))


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class JsonlTracker:
    """Appends one JSON object per logged step; the file is the run's ground truth."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, metrics: Mapping[str, Any], edit: int) -> None:
        rec = {"edit": edit, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()

    def summary(self, values: Mapping[str, Any]) -> None:
        path = self.path.with_name("summary.json")
        old = json.loads(path.read_text()) if path.exists() else {}
        old.update({k: _clean(v) for k, v in values.items()})
        path.write_text(json.dumps(old, indent=2))

    def log_checkpoint(self, path: Path, edit: int) -> None:
        pass  # the checkpoint already lives in the run dir

    def finish(self) -> None:
        pass


def wandb_mode(requested: str | None) -> str:
    """online when an API key is configured, offline otherwise; never prompts."""
    if requested:
        if requested not in ("online", "offline", "disabled"):
            raise ValueError(f"tracker.mode={requested!r} is not one of online, offline, disabled")
        return requested
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        import netrc

        hosts = netrc.netrc().hosts
        if any("wandb" in h for h in hosts):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


def new_run_id() -> str:
    """A W&B-style run id (8 of [a-z0-9]); wandb's own helper moved between releases."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def sweep_group() -> str | None:
    """Under a Hydra multirun, the sweep dir (its last two parts): all jobs of one sweep share it."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    parts = Path(str(hc.sweep.dir)).parts
    return "/".join(parts[-2:])[-128:]  # W&B caps group names at 128 characters


class WandbTracker:
    """One W&B run per edit stream; its id is kept in the run dir so a resumed job continues it."""

    def __init__(self, cfg, run_dir: Path, config: dict, name: str, tags: list[str], windows: Sequence[int]):
        import wandb

        self.wandb = wandb
        self.checkpoint_artifacts = cfg.checkpoint_artifacts
        run_dir = Path(run_dir)
        id_file = run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else new_run_id()
        id_file.write_text(run_id)
        self.mode = wandb_mode(cfg.mode)
        kwargs = dict(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group or sweep_group(),
            job_type=cfg.job_type,
            tags=list(dict.fromkeys([*cfg.tags, *tags])),
            name=name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
            settings=wandb.Settings(silent=True, console="off"),
        )
        try:
            self.run = wandb.init(mode=self.mode, **kwargs)
        except wandb.errors.Error as e:
            if self.mode != "online":
                raise
            # No network or a rejected key must not cost the experiment: keep the data locally.
            log.warning("W&B online init failed (%s); logging offline to %s, `wandb sync` it later", e, run_dir)
            self.mode = "offline"
            self.run = wandb.init(mode=self.mode, **kwargs)
        self.run.define_metric("edit")
        for ns in namespaces(windows):
            self.run.define_metric(f"{ns}/*", step_metric="edit")

    def log(self, metrics: Mapping[str, Any], edit: int) -> None:
        self.run.log({"edit": edit, **{k: v for k, v in metrics.items() if _clean(v) is not None}})

    def summary(self, values: Mapping[str, Any]) -> None:
        for k, v in values.items():
            self.run.summary[k] = _clean(v)

    def log_checkpoint(self, path: Path, edit: int) -> None:
        """Register a checkpoint (file or directory) as an artifact by reference: nothing uploads."""
        if not self.checkpoint_artifacts:
            return
        art = self.wandb.Artifact(f"checkpoint-{self.run.id}", type="checkpoint", metadata={"edit": edit})
        art.add_reference(Path(path).resolve().as_uri())
        self.run.log_artifact(art, aliases=["latest", f"edit-{edit}"])

    def finish(self) -> None:
        self.run.finish()


class Trackers:
    """Fan-out to every configured tracker."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log(self, metrics: Mapping[str, Any], edit: int) -> None:
        for t in self.trackers:
            t.log(metrics, edit)

    def summary(self, values: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.summary(values)

    def log_checkpoint(self, path: Path, edit: int) -> None:
        for t in self.trackers:
            t.log_checkpoint(path, edit)

    def finish(self) -> None:
        for t in self.trackers:
            t.finish()


def build_tracker(cfg, run_dir: Path, config: dict, name: str, tags: list[str], windows: Sequence[int]) -> Trackers:
    """``windows``: the run's ``eval.windows``, whose ``window<w>/`` metrics W&B plots against ``edit``."""
    trackers: list = [JsonlTracker(run_dir)]
    if cfg.name == "wandb" and wandb_mode(cfg.mode) != "disabled":
        trackers.append(WandbTracker(cfg, run_dir, config, name, tags, windows))
    elif cfg.name not in ("wandb", "none"):
        raise ValueError(f"tracker.name={cfg.name!r} is not one of wandb, none")
    return Trackers(trackers)
