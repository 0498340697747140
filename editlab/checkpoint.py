"""Checkpoints of a run, and resuming from them.

Layout inside a run dir::

    checkpoints/LATEST                 name of the newest complete checkpoint (written last)
    checkpoints/ckpt-0000050/
        deltas.safetensors             cumulative delta of every edited parameter (never base weights);
                                       metadata: edit, config hash, base model id
        state.safetensors              tensor leaves of the editor's and evaluator's state_dict, RNG
        state.json                     everything else: stream cursor, failed edits, JSON leaves of
                                       those state_dicts, metrics.jsonl length, W&B run id, the
                                       hashed config, and a checksum manifest of the two files
    ledger/steps-*.safetensors         per-step deltas (:mod:`editlab.journal`), one shard per checkpoint

A checkpoint is written into a hidden temporary directory, fsynced, renamed into place, and only
then named by ``LATEST``: a kill or a full disk at any moment leaves the previous checkpoint the
one a resume finds.  Any ``state_dict`` works unchanged: tensor and array leaves go to safetensors,
the rest must be JSON values (tuples come back as lists, dict keys must be strings).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from editlab.errors import CheckpointError, CheckpointRefused, CorruptCheckpoint
from editlab.evaluate.schedule import due
from editlab.journal import DeltaJournal

log = logging.getLogger(__name__)

FORMAT = "editlab-checkpoint/1"
DELTA_FORMAT = "editlab-cumulative-delta/1"
CKPT = re.compile(r"^ckpt-(\d{7})$")
TENSOR_REF = "__tensor__"

# What may legitimately differ between a run and its resume: where files are, how progress is
# shown or tracked, checkpoint cadence, the device(s), eval batching, and skip-vs-stop after a bad edit.
VOLATILE = ("run_dir", "resume", "cache_dir", "checkpoint", "tracker", "stream.progress", "stream.on_bad_edit",
            "data.root", "data.download", "data.counterfact_url", "data.zsre_url", "model.device", "model.device_map",
            "eval.batch_size", "hydra")
# Keys added after checkpoints already existed, with the values that mean "as before": at such a
# value they are left out of the hash, so older checkpoints still resume.
ADDED_AT_DEFAULT = {
    "eval.forget_sample": (0,), "eval.forget_sample_seed": (0,),
    # Norm-anchor scaling (off unless set); the skip factor's default is 2, ROME's 5.
    **{f"method.{k}": (None,) for k in ("norm_anchor", "norm_anchor_samples", "norm_anchor_trim",
                                        "norm_anchor_skip_factor")},
    "hparams.norm_anchor": (False,), "hparams.norm_anchor_samples": (1000,), "hparams.norm_anchor_trim": (0.05,),
    "hparams.norm_anchor_skip_factor": (2.0, 5.0),
}


# -- config identity -----------------------------------------------------------------------
def hashed_config(resolved: dict) -> dict:
    """The resolved config minus :data:`VOLATILE` keys: what must match for a resume."""
    out = json.loads(json.dumps(resolved, default=str))

    def parent(key: str) -> tuple[Any, str]:
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        return node, leaf

    for key in VOLATILE:
        node, leaf = parent(key)
        if isinstance(node, dict):
            node.pop(leaf, None)
    for key, defaults in ADDED_AT_DEFAULT.items():
        node, leaf = parent(key)
        if isinstance(node, dict) and leaf in node and node[leaf] in defaults:
            node.pop(leaf)
    data = out.get("data")
    if isinstance(data, dict) and data.get("dataset", "counterfact") == "counterfact":
        # A CounterFact run reads no zsRE file: its hash (and older checkpoints') names none.
        for key in ("dataset", "zsre", "zsre_url"):
            data.pop(key, None)
    return out


def config_hash(hashed: dict) -> str:
    return hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:16]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_diff(old: dict, new: dict, limit: int = 5) -> str:
    a, b = _flatten(old), _flatten(new)
    # Keys set on both sides first: a key only one side has is usually a newer code default.
    keys = sorted((k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>")),
                  key=lambda k: (k not in a or k not in b, k))
    parts = [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys[:limit]]
    return ", ".join(parts) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


# -- generic state_dict split ----------------------------------------------------------------
def split_tensors(obj: Any, path: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON with tensor references, {reference: tensor}) for any nested state_dict."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, at: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[at] = x.detach().to("cpu", copy=True).contiguous()
            return {TENSOR_REF: at}
        if isinstance(x, np.ndarray):
            tensors[at] = torch.from_numpy(np.ascontiguousarray(x).copy())
            return {TENSOR_REF: at, "numpy": True}
        if isinstance(x, dict):
            bad = [k for k in x if not isinstance(k, str)]
            if bad:
                raise TypeError(f"checkpoint: {at} has non-string keys {bad[:3]}; state_dict keys must be strings")
            return {k: walk(v, f"{at}/{k}") for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{at}/{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, (str, bool, int, float)):
            return x
        if isinstance(x, (np.integer, np.floating, np.bool_)):
            return x.item()
        raise TypeError(f"checkpoint: {at} is a {type(x).__name__}; state_dict leaves must be tensors, "
                        "arrays or JSON values")

    return walk(obj, path), tensors


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if TENSOR_REF in obj:
            t = tensors[obj[TENSOR_REF]]
            return t.numpy() if obj.get("numpy") else t
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    npst = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1], int(npst[2]), int(npst[3]), float(npst[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    elif cuda:
        log.warning("checkpoint holds RNG states of %d CUDA devices; this process has %d: not restored",
                    len(cuda), torch.cuda.device_count() if torch.cuda.is_available() else 0)


# -- files ------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def ckpt_name(edit: int) -> str:
    return f"ckpt-{edit:07d}"


def latest_name(root: Path) -> str | None:
    p = root / "LATEST"
    return p.read_text().strip() if p.exists() else None


def committed_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(edit, path) of every checkpoint at or before ``LATEST``, oldest first."""
    root = Path(root)
    latest = latest_name(root)
    if latest is None or not CKPT.match(latest):
        return []
    upto = int(CKPT.match(latest).group(1))
    out = [(int(m.group(1)), p) for p in root.iterdir() if (m := CKPT.match(p.name)) and p.is_dir()]
    return sorted((e, p) for e, p in out if e <= upto)


@dataclass
class Checkpoint:
    path: Path
    edit: int
    state: dict[str, Any]  # state.json with tensor references resolved
    deltas: dict[str, torch.Tensor]


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Load and verify one checkpoint directory (raises :class:`CorruptCheckpoint`)."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"checkpoint {path}: state.json unreadable ({e})") from e
    if state.get("format") != FORMAT:
        raise CorruptCheckpoint(f"checkpoint {path}: format {state.get('format')!r}, expected {FORMAT!r}")
    for name, info in state["files"].items():
        f = path / name
        if not f.exists():
            raise CorruptCheckpoint(f"checkpoint {path}: {name} is missing")
        if f.stat().st_size != info["bytes"] or sha256_file(f) != info["sha256"]:
            raise CorruptCheckpoint(f"checkpoint {path}: {name} does not match its checksum in state.json")
    try:
        with safe_open(str(path / "deltas.safetensors"), framework="pt") as f:
            meta = f.metadata() or {}
        deltas = load_file(path / "deltas.safetensors")
        tensors = load_file(path / "state.safetensors")
    except Exception as e:
        raise CorruptCheckpoint(f"checkpoint {path}: unreadable safetensors ({e})") from e
    if meta.get("edit") != str(state["edit"]):
        raise CorruptCheckpoint(f"checkpoint {path}: deltas are of edit {meta.get('edit')}, state of {state['edit']}")
    for key in ("editor", "evaluator", "rng"):
        state[key] = join_tensors(state[key], tensors)
    return Checkpoint(path=path, edit=int(state["edit"]), state=state, deltas=deltas)


# -- the run's checkpointer ---------------------------------------------------------------------
class Checkpointer:
    """Writes a run's checkpoints (an ``EditStream.on_step`` callback) and resumes from them."""

    def __init__(self, run_dir: str | Path, cfg, resolved: dict, model_id: str):
        if cfg.every < 0 or cfg.keep < 0:
            raise ValueError(f"checkpoint.every and checkpoint.keep must be >= 0, got {cfg.every}, {cfg.keep}")
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.every, self.keep = cfg.every, cfg.keep
        self.config = hashed_config(resolved)
        self.hash = config_hash(self.config)
        self.model_id = model_id
        self.journal = DeltaJournal(self.run_dir / "ledger", dense=cfg.dense_ledger) if cfg.ledger else None
        self.last_edit = 0  # edit of the newest checkpoint written or resumed from
        self._prev = 0  # the cursor at the previous step

    # -- resuming ----------------------------------------------------------------------
    def start(self, mode: str) -> Checkpoint | None:
        """Find the checkpoint to resume from per ``mode`` and rewind the run dir to it.

        Returns ``None`` for a fresh start, after clearing what an earlier attempt that never
        reached a checkpoint left behind (metrics lines, ledger shards).
        """
        if mode not in ("auto", "never", "force"):
            raise ValueError(f"resume must be auto, never or force, got {mode!r}")
        if mode == "never":
            if self.root.exists() and any(self.root.iterdir()) or self._metrics_size() > 0:
                raise CheckpointRefused(f"{self.run_dir} already holds a run; resume=never will not touch it "
                                        "(choose another run_dir, or resume=auto to continue it)")
            ck = None
        else:
            ck = self._find(force=mode == "force")
        if ck is None:
            self._fresh()
        else:
            self._rewind(ck, force=mode == "force")
        return ck

    def _find(self, force: bool) -> Checkpoint | None:
        if not self.root.exists():
            return None
        for tmp in sorted(self.root.glob(".tmp-*")):
            log.warning("ignoring half-written checkpoint %s (removed)", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        latest = latest_name(self.root)
        dirs = sorted((int(m.group(1)), p) for p in self.root.iterdir() if (m := CKPT.match(p.name)))
        if latest is not None and not CKPT.match(latest):
            raise CorruptCheckpoint(f"{self.root / 'LATEST'} names {latest!r}, not a checkpoint")
        upto = int(CKPT.match(latest).group(1)) if latest else -1
        for edit, p in dirs:
            if edit > upto:
                log.warning("ignoring checkpoint %s: never committed (LATEST names %s); removed", p, latest)
                shutil.rmtree(p, ignore_errors=True)
        if latest is None:
            return None
        candidates = [p for e, p in reversed(dirs) if e <= upto]
        if not (self.root / latest).is_dir():
            candidates.insert(0, self.root / latest)
        for i, p in enumerate(candidates):
            try:
                ck = read_checkpoint(p)
            except CorruptCheckpoint as e:
                older = [c.name for c in candidates[i + 1:]]
                if not force:
                    raise CorruptCheckpoint(f"{e}. resume=force falls back to the newest older checkpoint "
                                            f"that reads ({', '.join(older) or 'none left'})") from e
                log.warning("resume=force: skipping %s", e)
                continue
            self._check_identity(ck, force)
            return ck
        raise CorruptCheckpoint(f"no readable checkpoint in {self.root}; move it away to start over")

    def _check_identity(self, ck: Checkpoint, force: bool) -> None:
        problems = []
        if ck.state["model_id"] != self.model_id:
            problems.append(f"its base model is {ck.state['model_id']!r}, this run's is {self.model_id!r}")
        if ck.state["config_hash"] != self.hash:
            problems.append(f"config hash {ck.state['config_hash']} != {self.hash} "
                            f"({config_diff(ck.state['config'], self.config)})")
        if not problems:
            return
        msg = f"checkpoint {ck.path} belongs to another run: " + "; ".join(problems)
        if not force:
            raise CheckpointRefused(msg + ". Use another run_dir, or resume=force to load it anyway")
        log.warning("resume=force: %s", msg)

    def _metrics_size(self) -> int:
        return self.metrics_path.stat().st_size if self.metrics_path.exists() else 0

    def _fresh(self) -> None:
        size = self._metrics_size()
        if size:
            log.warning("%s holds metrics but no checkpoint: starting over and discarding them", self.metrics_path)
            os.truncate(self.metrics_path, 0)
        if self.journal is not None:
            self.journal.rewind(0)
        self.last_edit = self._prev = 0

    def _rewind(self, ck: Checkpoint, force: bool) -> None:
        """Cut metrics.jsonl back to what the checkpoint had seen, restore the W&B id, drop later ledger."""
        want, size = ck.state["metrics"]["bytes"], self._metrics_size()
        if size < want:
            msg = (f"{self.metrics_path} has {size} bytes but the checkpoint at edit {ck.edit} saw {want}: "
                   "the metric history was lost or replaced")
            if not force:
                raise CheckpointRefused(msg + "; resume=force continues anyway")
            log.warning("resume=force: %s", msg)
        elif size > want:
            log.info("dropping %d bytes of metrics logged after the checkpoint at edit %d", size - want, ck.edit)
            os.truncate(self.metrics_path, want)
        run_id = ck.state.get("wandb_run_id")
        id_file = self.run_dir / "wandb_run_id"
        if run_id and (not id_file.exists() or id_file.read_text().strip() != run_id):
            id_file.write_text(run_id)
        if self.journal is not None:
            self.journal.rewind(ck.edit)
        self.last_edit = self._prev = ck.edit

    def restore(self, ck: Checkpoint, stream) -> None:
        """Load a checkpoint into a stream whose model is still unedited (after ``Editor.prepare``)."""
        stream.weights.restore(ck.deltas)
        stream.editor.load_state_dict(ck.state["editor"])
        stream.evaluator.load_state_dict(ck.state["evaluator"])
        stream.state.load_state_dict(ck.state["stream"])
        set_rng_state(ck.state["rng"])
        log.info("resumed from %s at edit %d", ck.path, ck.edit)

    # -- writing -----------------------------------------------------------------------
    def on_step(self, stream) -> None:
        prev, now = self._prev, stream.state.n_done
        self._prev = now
        if now == len(stream.requests) or due(self.every, prev, now, len(stream.requests)):
            self.save(stream)

    def save(self, stream) -> Path | None:
        edit = stream.state.n_done
        final = self.root / ckpt_name(edit)
        if edit == self.last_edit and final.exists():
            return None  # nothing new since the checkpoint this run resumed from or last wrote
        t0 = time.perf_counter()
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
        try:
            if self.journal is not None:
                self.journal.flush(edit)
            self._write(stream, tmp, edit)
            if final.exists():  # an uncommitted leftover of an earlier attempt
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync(self.root)
            pointer = self.root / ".LATEST.tmp"
            pointer.write_text(final.name)
            _fsync(pointer)
            os.replace(pointer, self.root / "LATEST")
            _fsync(self.root)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            (self.root / ".LATEST.tmp").unlink(missing_ok=True)
            raise CheckpointError(f"writing checkpoint {final} failed ({e}); "
                                  f"the previous one ({latest_name(self.root)}) is intact") from e
        self.last_edit = edit
        self._prune()
        stream.tracker.log_checkpoint(final, edit)
        log.info("checkpoint %s written in %.2fs", final, time.perf_counter() - t0)
        return final

    def _write(self, stream, tmp: Path, edit: int) -> None:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        editor, t_editor = split_tensors(stream.editor.state_dict(), "editor")
        evaluator, t_eval = split_tensors(stream.evaluator.state_dict(), "evaluator")
        rng, t_rng = split_tensors(rng_state(), "rng")
        meta = {"format": DELTA_FORMAT, "edit": str(edit), "config_hash": self.hash, "model_id": self.model_id}
        deltas = {n: c.detach().to("cpu", copy=True).contiguous() for n, c in stream.weights.cumulative.items()}
        save_file(deltas, str(tmp / "deltas.safetensors"), metadata=meta)
        save_file({**t_editor, **t_eval, **t_rng}, str(tmp / "state.safetensors"))
        if self.metrics_path.exists():
            _fsync(self.metrics_path)  # the checkpoint must not outlive the lines it counts
        id_file = self.run_dir / "wandb_run_id"
        files = {}
        for name in ("deltas.safetensors", "state.safetensors"):
            _fsync(tmp / name)
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
        state = {
            "format": FORMAT,
            "edit": edit,
            "config_hash": self.hash,
            "model_id": self.model_id,
            "config": self.config,
            "stream": stream.state.state_dict(),
            "editor": editor,
            "evaluator": evaluator,
            "rng": rng,
            "metrics": {"bytes": self._metrics_size(), "last_edit": edit},
            "wandb_run_id": id_file.read_text().strip() if id_file.exists() else None,
            "files": files,
            "written_at": time.time(),
        }
        (tmp / "state.json").write_text(json.dumps(state))
        _fsync(tmp / "state.json")
        _fsync(tmp)

    def _prune(self) -> None:
        if self.keep == 0:
            return
        for _, p in committed_checkpoints(self.root)[:-self.keep]:
            shutil.rmtree(p, ignore_errors=True)
