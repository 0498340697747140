"""Build a run from a composed config and execute its edit stream.

The steps are those of docs/architecture.md, "The flow of an edit".
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from editlab.checkpoint import Checkpointer
from editlab.data import build_requests
from editlab.deltas import WeightWriter
from editlab.errors import StreamStopped
from editlab.evaluate.evaluator import Evaluator
from editlab.evaluate.fluency import generation_prompts
from editlab.evaluate.forgetting import check_sample
from editlab.methods import EditorContext, build_editor
from editlab.models import load_model
from editlab.models.loading import layer_count
from editlab.publish import publish_results
from editlab.stream import EditStream
from editlab.tracking import build_tracker

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    # Everything that can fail on bad input fails here, before any compute.  The model's layer
    # count comes from its config, before its weights: a method with no row for it scales its layers.
    ctx = EditorContext(
        cache_dir=Path(cfg.cache_dir).expanduser(),
        data_root=Path(cfg.data.root).expanduser(),
        seed=cfg.seed,
        wikitext=cfg.data.wikitext,
        counterfact=cfg.data.counterfact,
        n_layers=layer_count(cfg.model, cfg.cache_dir, seed=cfg.seed),
    )
    editor = build_editor(cfg.method, cfg.model.name, ctx)
    requests = build_requests(cfg.data, cfg.sample)
    if cfg.eval.fluency_every > 0:
        generation_prompts(requests, cfg.eval.fluency_prompts)
    check_sample(cfg.eval.forget_sample)
    lm = load_model(cfg.model, cfg.cache_dir, seed=cfg.seed)
    editor.prepare(lm, requests)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["hparams"] = OmegaConf.to_container(OmegaConf.structured(editor.hp))
    # Before anything is written: a foreign checkpoint is refused, a resume cuts metrics.jsonl back.
    ckpts = Checkpointer(run_dir, cfg.checkpoint, resolved, lm.model_id)
    resume_from = ckpts.start(cfg.resume)
    (run_dir / "config.json").write_text(json.dumps(resolved, indent=2))
    tags = [f"method:{cfg.method.name}", f"model:{cfg.model.name}", f"sample:{cfg.sample.index}"]
    name = f"{cfg.method.name}-{cfg.model.name}-s{cfg.sample.index}"
    tracker = build_tracker(cfg.tracker, run_dir, resolved, name, tags, cfg.eval.windows)

    weights = WeightWriter(lm.model, max_delta_norm=cfg.stream.max_delta_norm, journal=ckpts.journal)
    evaluator = Evaluator(cfg.eval, lm, weights, requests, glue_dir=ctx.data_root / cfg.data.glue)
    stream = EditStream(lm, editor, requests, evaluator, tracker, weights,
                        batch_size=cfg.sample.batch_size, on_bad_edit=cfg.stream.on_bad_edit,
                        progress=cfg.stream.progress)
    if resume_from is not None:
        ckpts.restore(resume_from, stream)  # the model is unedited until here: prepare saw base weights
        planned = resume_from.state["config"]["sample"]["n_edits"]
        if resume_from.edit == len(requests) < planned:  # a longer run ended at its checkpoint
            stream.close_early(planned)
    stream.on_step.append(ckpts.on_step)
    try:
        state = stream.run()
        summary = {"n_edits": state.n_done, "n_failed": len(state.failed), **evaluator.summary()}
        if cfg.eval.confirm_disabling:
            def fresh_editor():  # on the unedited model: prepare sees base weights, as in the run
                ed = build_editor(cfg.method, cfg.model.name, ctx)
                ed.prepare(lm, requests)
                return ed
            summary.update(evaluator.confirm_disabling(fresh_editor))
        if evaluator.forget is not None:
            (run_dir / "forgetting.json").write_text(json.dumps(evaluator.forget_history()))
        if state.failed:
            (run_dir / "failed_edits.json").write_text(json.dumps(state.failed, indent=2))
        tracker.summary(summary)
        publish_results(run_dir, tracker, draw=cfg.tracker.plots)  # Table 3 + plots; never raises
    except StreamStopped:
        ckpts.save(stream)  # at the cursor before the failed step, which a resume does again
        (run_dir / "failed_edits.json").write_text(json.dumps(stream.state.failed, indent=2))
        raise
    finally:
        tracker.finish()
    log.info("results in %s", run_dir)
    return summary
