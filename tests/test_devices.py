"""Editing and evaluation use each module's own device, never "the model's" one.

A model split across GPUs has no single device: input ids go to the embedding's, a tensor that
meets layer l's weight must be on layer l's.  The CPU offers no second device that computes, so
these tests use two proxies on a tiny model and require every method's edits (deltas, editor
state, ES) and the downstream scores to equal those of the plain model:

* a decoy first parameter on the meta device, in float16: whatever is put on or cast to
  ``next(model.parameters())`` (Hugging Face's ``model.device``/``model.dtype``) then fails, a
  meta tensor having no values, instead of passing because every module shares one device;
* ``bench.gpu_check``'s split (accelerate's per-block device hooks, the machinery behind
  ``model.device_map``) with the CPU on both sides, so that the hooks meet every method's own
  forward hooks and traces.

Tensors that really cross devices are compared by ``make gpu-check`` (bench/gpu_check.py), on a
machine with a GPU.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose
from test_eval_downstream import TOY, _toy_examples
from torch import nn

from bench.gpu_check import compare, run_edits, split_across
from editlab.data import build_requests
from editlab.evaluate.downstream import DownstreamEval
from editlab.mend.net import MENDNet, spec_from_model
from editlab.mend.store import save_editor
from editlab.methods import METHODS
from editlab.models import load_model


def with_decoy(lm):
    """``lm`` whose model's first parameter is on the meta device (and in float16)."""
    decoy = nn.Parameter(torch.empty(1, dtype=torch.float16, device="meta"), requires_grad=False)
    lm.model.register_parameter("decoy", decoy)
    assert next(lm.model.parameters()) is decoy
    return lm


def tiny(cache: Path, place=None):
    lm = load_model(compose("model=tiny-llama").model, cache)
    return lm if place is None else place(lm)


PLACEMENTS = {"decoy": with_decoy, "split": lambda lm: split_across(with_decoy(lm), torch.device("cpu"))}


@pytest.fixture(scope="module")
def mend_editor(tmp_path_factory):
    """An untrained MEND network (its update is the scaled gradient): enough to follow devices."""
    out = tmp_path_factory.mktemp("mend")
    lm = tiny(out)
    net = MENDNet(spec_from_model(lm.table, [1, 2, 3], rank=8, depth=1, init_lr=1e-2))
    save_editor(out, net, {"model_id": lm.model_id, "layers": [1, 2, 3]})
    return out


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_edits_do_not_depend_on_the_first_parameter(method, placement, tmp_path, data_root, mend_editor):
    cfg = compose("model=tiny-llama", f"method={method}",
                  *([f"method.editor_path={mend_editor}"] if method == "mend" else []))
    requests = build_requests(cfg.data, cfg.sample)[:2]
    ref = run_edits(tiny(tmp_path), cfg, requests, tmp_path / "plain")
    got = run_edits(tiny(tmp_path, PLACEMENTS[placement]), cfg, requests, tmp_path / placement)
    assert ref.deltas or ref.state  # GRACE edits its codebook, not weights
    assert got.templates == ref.templates and got.es == ref.es
    assert compare(got, ref) == {"delta": 0.0, "state": 0.0, "C": 0.0}


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_downstream_scores_do_not_depend_on_the_first_parameter(placement, tmp_path):
    def scores(lm):
        de = DownstreamEval(lm, [(TOY, _toy_examples())], batch_size=4, gen_tokens=3)
        return [de.predict(de.tasks[0], use_cache=c) for c in (True, False)]

    for ref, got in zip(scores(tiny(tmp_path)), scores(tiny(tmp_path, PLACEMENTS[placement]))):
        assert got.texts == ref.texts and got.lik == ref.lik
        torch.testing.assert_close(got.word_logprobs, ref.word_logprobs, rtol=0, atol=0)
