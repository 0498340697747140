"""Everything the eval schedule measures after a step, as flat ``namespace/name`` metrics.

Namespaces: ``edit/`` (the step's new edits), ``window<w>/`` (means over the last w edits),
``forget/`` (earlier edits re-scored), ``downstream/`` (few-shot GLUE F1), ``distance/`` (edited
weights vs base).  The histories collapse detection needs are kept here and go through
``state_dict()``, so a resumed run detects collapse over the whole stream.
"""
from __future__ import annotations

import logging
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

from editlab.data.requests import EditRequest
from editlab.deltas import WeightWriter
from editlab.errors import BadEdit, EditFailed
from editlab.evaluate.collapse import Jump, collapse_onset, jumps
from editlab.evaluate.downstream import DownstreamEval
from editlab.evaluate.fluency import FluencyEval, generation_prompts
from editlab.evaluate.forgetting import ForgetTracker, fact_scores
from editlab.evaluate.rewrite import score_requests
from editlab.evaluate.schedule import due
from editlab.evaluate.zsre import ZsreScorer
from editlab.models.loading import LoadedModel

log = logging.getLogger(__name__)

WINDOWED = ("es", "ps", "ns", "es_mag", "ps_mag", "ns_mag")


class Evaluator:
    def __init__(self, cfg, lm: LoadedModel, weights: WeightWriter, requests: Sequence[EditRequest],
                 glue_dir: Path | None = None):
        self.cfg = cfg
        self.lm = lm
        self.weights = weights
        self.requests = list(requests)  # the whole stream, in order (forgetting re-scores a prefix)
        self.n_edits = len(self.requests)
        self.windows = {w: deque(maxlen=w) for w in cfg.windows}
        datasets = {r.dataset for r in self.requests}
        if len(datasets) > 1:
            raise ValueError(f"one stream mixes requests of datasets {sorted(datasets)}: they are scored differently")
        # zsRE is scored by token accuracy, its locality against the unedited model's predictions,
        # which ZsreScorer takes now: the evaluator is built before any edit (or restored delta).
        self.zsre = ZsreScorer(lm.model, lm.tok, self.requests, cfg.batch_size) if datasets == {"zsre"} else None
        self.windowed, self.efficacy_key = (self.zsre.metrics, self.zsre.efficacy) if self.zsre else (WINDOWED, "es")
        # zsRE's earlier edits are re-scored by the same token accuracy.
        scorer = self.zsre.facts if self.zsre else fact_scores
        self.forget = (ForgetTracker(cfg.forget_paraphrase, cfg.batch_size, cfg.forget_sample, cfg.forget_sample_seed,
                                     scorer) if cfg.forget_every > 0 else None)
        self.downstream: DownstreamEval | None = None
        if cfg.downstream_every > 0 and cfg.downstream_tasks:
            if glue_dir is None:
                log.info("no GLUE directory given: downstream rounds are off")
            else:
                self.downstream = DownstreamEval.from_dir(
                    lm, glue_dir, list(cfg.downstream_tasks), cfg.downstream_n, batch_size=cfg.batch_size,
                    gen_tokens=cfg.generate_tokens, generate=cfg.downstream_generate,
                    likelihood=cfg.downstream_likelihood)
        self.fluency = None
        if cfg.fluency_every > 0:
            prompts = generation_prompts(self.requests, cfg.fluency_prompts)
            self.fluency = FluencyEval(prompts, max_len=cfg.fluency_tokens)
        # (edit, value) curves for collapse detection
        self.history: dict[str, list[tuple[int, float]]] = {"distance": [], "efficacy": [], "downstream": []}

    # -- state carried across a resume -------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"windows": {str(w): list(d) for w, d in self.windows.items()},
                "history": {k: [list(p) for p in v] for k, v in self.history.items()},
                "forget": self.forget.state_dict() if self.forget else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for w, values in state.get("windows", {}).items():
            self.windows[int(w)].clear()
            self.windows[int(w)].extend(values)
        for k, points in state.get("history", {}).items():
            self.history[k] = [(int(e), float(v)) for e, v in points]
        if self.forget and state.get("forget"):
            self.forget.load_state_dict(state["forget"])

    # -- measurements --------------------------------------------------------------------
    def new_edit_scores(self, batch: Sequence[EditRequest]) -> list[dict[str, float]]:
        if self.zsre is not None:
            return self.zsre.score(self.lm.model, self.lm.tok, batch)
        return score_requests(self.lm.model, self.lm.tok, batch, batch_size=self.cfg.batch_size)

    def distance_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        dists = self.weights.distances()
        for name, d in dists.items():
            out[f"distance/{name}"] = d["fro_per_numel"]
            out[f"distance/relative/{name}"] = d["relative"]
        if dists:
            out["distance/mean"] = sum(d["fro_per_numel"] for d in dists.values()) / len(dists)
            out["distance/relative_mean"] = sum(d["relative"] for d in dists.values()) / len(dists)
        return out

    def baseline(self) -> dict[str, float]:
        """Measurements of the unedited model (edit 0)."""
        return self._scheduled(prev=-1, now=0)

    def after_step(self, prev: int, now: int, batch: Sequence[EditRequest]) -> tuple[dict[str, float], list[dict]]:
        metrics: dict[str, float] = {}
        per_request: list[dict] = []
        if due(self.cfg.new_edit_every, prev, now, self.n_edits) or self.cfg.new_edit_every == 1:
            metrics, per_request = self._new_edits(batch, now)
        if self.forget is not None:
            # What held when made; a forgetting round only re-scores edits of earlier steps.
            self.forget.record(self.lm.model, self.lm.tok, batch)
        metrics.update(self._scheduled(prev, now))
        return metrics, per_request

    def close_early(self, prev: int, now: int, batch: Sequence[EditRequest], planned: int) -> dict[str, float]:
        """The measurements a stream ending at ``now`` takes after its last step, ``prev..now``,
        that the run it is resumed from skipped there because it was planned to ``planned`` edits:
        its checkpoint at ``now`` then ends a run that asked for ``now`` edits exactly as that run ends."""
        def fires(period: int) -> bool:
            return due(period, prev, now, now) and not due(period, prev, now, planned)

        metrics: dict[str, float] = {}
        if fires(self.cfg.new_edit_every):  # never with period 1: every step scored them
            metrics, _ = self._new_edits(batch, now)
        metrics.update(self._scheduled(prev, now, fires))
        return metrics

    def _new_edits(self, batch: Sequence[EditRequest], now: int) -> tuple[dict[str, float], list[dict]]:
        """The step's new edits scored, their means, and the windows' means once they are added."""
        metrics: dict[str, float] = {}
        per_request = self.new_edit_scores(batch)
        for key in per_request[0]:
            vals = [r[key] for r in per_request if key in r]
            metrics[f"edit/{key}"] = sum(vals) / len(vals)
        self.history["efficacy"].append((now, metrics[f"edit/{self.efficacy_key}"]))
        for r in per_request:
            for d in self.windows.values():
                d.append({k: r[k] for k in self.windowed if k in r})
        for w, d in self.windows.items():
            for key in self.windowed:
                vals = [x[key] for x in d if key in x]
                if vals:
                    metrics[f"window{w}/{key}"] = sum(vals) / len(vals)
        return metrics, per_request

    def _scheduled(self, prev: int, now: int, fires: Callable[[int], bool] | None = None) -> dict[str, float]:
        """The periodic measurements ``fires`` (default: the schedule of this stream's length) picks."""
        if fires is None:
            def fires(period: int) -> bool:
                return due(period, prev, now, self.n_edits)

        metrics: dict[str, float] = {}
        if fires(self.cfg.distance_every) and now > 0:
            metrics.update(self.distance_metrics())
            self.history["distance"].append((now, metrics.get("distance/mean", 0.0)))
        if self.forget is not None and fires(self.cfg.forget_every) and prev > 0:
            metrics.update(self.forget.round(self.lm.model, self.lm.tok, self.requests[:prev], now))
        if self.fluency is not None and fires(self.cfg.fluency_every):
            metrics.update(self.fluency.round(self.lm.model, self.lm.tok))
        if self.downstream is not None and fires(self.cfg.downstream_every):
            scores = self.downstream.round()
            metrics.update(scores)
            mean = scores.get("downstream/mean_f1_gen", scores.get("downstream/mean_f1_lik"))
            if mean is not None:
                self.history["downstream"].append((now, mean))
        return metrics

    # -- collapse -------------------------------------------------------------------------
    def _disabling_jumps(self) -> list[Jump]:
        return jumps(self.history["distance"], self.cfg.disabling_factor, self.cfg.collapse_min_history)

    def _case_ids(self, j: Jump) -> list[int]:
        return [r.case_id for r in self.requests[j.prev:j.edit]]

    def disabling(self) -> list[dict[str, Any]]:
        return [{"edit": j.edit, "case_ids": self._case_ids(j), "jump": j.jump, "median": j.median,
                 "ratio": j.ratio} for j in self._disabling_jumps()]

    def summary(self) -> dict[str, Any]:
        c = self.cfg
        onset = collapse_onset(self.history["distance"], self.history["efficacy"], self.history["downstream"],
                               c.onset_factor, c.collapse_window, c.collapse_es_drop, c.collapse_f1_drop,
                               c.collapse_min_history)
        disabling = self.disabling()
        return {"collapse/onset": onset, "collapse/disabling": disabling, "collapse/n_disabling": len(disabling)}

    def forget_history(self) -> dict[str, Any]:
        """Per edit in stream order: case_id, whether it held when made, and its forget index (the
        edit count of the round that first found it lost; None = never).  Every round's outcome
        vector stays in ``state_dict()`` (checkpoints), too big for a JSON file on long streams."""
        if self.forget is None:
            return {}
        made = self.forget.made
        return {"case_ids": [r.case_id for r in self.requests[:len(made)]],
                "made_es": [f.es for f in made], "forget_at": list(self.forget.forget_at),
                "rounds": [r["edit"] for r in self.forget.rounds]}

    def confirm_disabling(self, make_editor: Callable[[], Any]) -> dict[str, Any]:
        """Apply each disabling edit alone to the unedited model: does it still disable it?

        "Disables" = its distance from the base is ``disabling_factor`` times the median step jump
        of the run at that point, and (when downstream is measured) the likelihood F1 falls by
        ``collapse_f1_drop`` from the unedited model's.  The run's weights are restored after.
        """
        suspects = self._disabling_jumps()
        if not suspects:
            return {"collapse/confirmed": []}
        saved = {n: c.clone() for n, c in self.weights.cumulative.items()}
        results = []
        self.weights.reset()
        try:
            base_f1 = self._lik_f1()
            editor = make_editor()
            for j in suspects:
                res: dict[str, Any] = {"edit": j.edit, "case_ids": self._case_ids(j)}
                try:
                    self.weights.apply(editor.apply(self.lm, self.requests[j.prev:j.edit]))
                except (BadEdit, EditFailed) as e:
                    res.update(disables=None, reason=f"{type(e).__name__}: {e}")
                    results.append(res)
                    continue
                d = self.distance_metrics().get("distance/mean", 0.0)
                f1 = self._lik_f1()
                ratio = d / j.median
                disables = ratio >= self.cfg.disabling_factor
                if f1 is not None and base_f1 is not None:
                    disables = disables and base_f1 - f1 >= self.cfg.collapse_f1_drop
                res.update(distance=d, ratio=ratio, f1_lik=f1, base_f1_lik=base_f1, disables=disables)
                results.append(res)
                self.weights.reset()
        finally:
            self.weights.reset()
            self.weights.restore(saved)
        return {"collapse/confirmed": results}

    def _lik_f1(self) -> float | None:
        if self.downstream is None or not self.downstream.likelihood:
            return None
        # the cheap score is enough to tell a disabled model
        return self.downstream.round(generate=False)["downstream/mean_f1_lik"]
