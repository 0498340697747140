"""The edit stream: for each step, edit → apply through the weight writer → evaluate → log.

The stream knows nothing of any method's maths: it hands a step's requests to the editor,
applies the returned delta through the :class:`WeightWriter`, and lets the evaluator decide
what is due.
"""
from __future__ import annotations

import logging
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from editlab.data.requests import EditRequest
from editlab.deltas import WeightWriter
from editlab.errors import BadEdit, EditFailed, StreamStopped
from editlab.evaluate.evaluator import Evaluator
from editlab.methods.base import Editor
from editlab.models.loading import LoadedModel

log = logging.getLogger(__name__)


def console_loggers() -> list[logging.Logger]:
    """The loggers that print to the terminal themselves: the root (Hydra's console handler) and
    libraries with a handler of their own that does not propagate (transformers)."""
    loggers = [logging.root, *(l for l in logging.root.manager.loggerDict.values() if isinstance(l, logging.Logger))]
    return [l for l in loggers if any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)
                                      for h in l.handlers)]


@dataclass
class StreamState:
    """The cursor: how many requests are done, and which failed."""

    n_done: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"n_done": self.n_done, "failed": list(self.failed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n_done = int(state["n_done"])
        # A failure past the cursor is the step a ``stop`` ended on; resuming does that step again.
        self.failed = [f for f in state["failed"] if f["edit"] <= self.n_done]


class EditStream:
    def __init__(
        self,
        lm: LoadedModel,
        editor: Editor,
        requests: Sequence[EditRequest],
        evaluator: Evaluator,
        tracker,
        weights: WeightWriter,
        batch_size: int = 1,
        on_bad_edit: str = "skip",
        progress: bool | None = None,
    ):
        if on_bad_edit not in ("skip", "stop"):
            raise ValueError(f"stream.on_bad_edit must be 'skip' or 'stop', got {on_bad_edit!r}")
        if batch_size < 1:
            raise ValueError(f"sample.batch_size must be >= 1, got {batch_size}")
        self.lm, self.editor, self.requests = lm, editor, list(requests)
        self.evaluator, self.tracker, self.weights = evaluator, tracker, weights
        self.batch_size, self.on_bad_edit = batch_size, on_bad_edit
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.state = StreamState()
        self.on_step = []  # callbacks(stream) after every step (checkpointing hangs here)

    def run(self) -> StreamState:
        n = len(self.requests)
        if self.state.n_done == 0:
            self.tracker.log(self.evaluator.baseline(), 0)
        windowed_es = f"window{max(self.evaluator.windows, default=0)}/es"  # the widest window's mean
        bar = tqdm(total=n, initial=self.state.n_done, desc=f"{self.editor.name} edits", unit="edit",
                   disable=not self.progress, dynamic_ncols=True)
        # While the bar is drawn, log lines go through tqdm.write, above the bar instead of into it.
        logs_above = logging_redirect_tqdm(console_loggers(), tqdm_class=tqdm) if self.progress else nullcontext()
        with bar, logs_above:
            while self.state.n_done < n:
                prev = self.state.n_done
                batch = self.requests[prev: prev + self.batch_size]
                now = prev + len(batch)
                metrics = self.step(batch, prev, now)
                self.state.n_done = now
                self.tracker.log(metrics, now)
                for cb in self.on_step:
                    cb(self)
                bar.update(len(batch))
                if "edit/es" in metrics:
                    bar.set_postfix(es=f"{metrics.get(windowed_es, metrics['edit/es']):.2f}")
        return self.state

    def close_early(self, planned: int) -> None:
        """After a resume at the stream's end, from a run that was planned to ``planned`` edits:
        log, at the last edit, the measurements a stream of this length takes there (see
        :meth:`Evaluator.close_early`).  A second record at the same edit adds to the first."""
        n = self.state.n_done
        prev = (n - 1) // self.batch_size * self.batch_size  # steps start at multiples of the batch size
        metrics = self.evaluator.close_early(prev, n, self.requests[prev:n], planned)
        if metrics:
            self.tracker.log(metrics, n)

    def step(self, batch: Sequence[EditRequest], prev: int, now: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        metrics: dict[str, Any] = {}
        try:
            delta = self.editor.apply(self.lm, batch)
            norms = self.weights.apply(delta, span=(prev + 1, now))
            metrics.update({f"method/{k}": v for k, v in delta.info.items()})
            metrics.update({f"method/delta_norm/{name}": n for name, n in norms.items()})
            metrics["edit/failed"] = 0
        # A singular solve mid-stream is a failed edit of that request, not the end of the run.
        except (BadEdit, EditFailed, torch.linalg.LinAlgError) as e:
            reason = f"{type(e).__name__}: {e}"
            log.warning("edit %d..%d (case_ids %s) failed: %s", prev + 1, now, [r.case_id for r in batch], reason)
            self.state.failed.append({"edit": now, "case_ids": [r.case_id for r in batch], "reason": reason})
            metrics["edit/failed"] = 1
            if self.on_bad_edit == "stop":
                raise StreamStopped(reason) from e
        t1 = time.perf_counter()
        scores, _ = self.evaluator.after_step(prev, now, batch)
        metrics.update(scores)
        metrics["time/edit_s"] = (t1 - t0) / len(batch)
        metrics["time/eval_s"] = time.perf_counter() - t1
        return metrics
