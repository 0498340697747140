"""The Evaluator: schedule (incl. edit 0 and the last edit), distance, state across a resume."""
import copy

import pytest
import torch
from omegaconf import OmegaConf

from editlab.config import EvalConfig
from editlab.data import build_requests
from editlab.deltas import Delta, WeightWriter
from editlab.evaluate.downstream import DownstreamEval
from editlab.evaluate.evaluator import Evaluator
from tests.conftest import compose
from tests.test_eval_downstream import TOY, _toy_examples

PARAM = "transformer.h.1.mlp.c_proj.weight"


@pytest.fixture(scope="module")
def requests(data_root):
    cfg = compose("sample.n_edits=10")
    return build_requests(cfg.data, cfg.sample)


def _cfg(**kw):
    base = dict(name="t", forget_every=3, downstream_every=4, distance_every=1, batch_size=8)
    return OmegaConf.structured(EvalConfig(**{**base, **kw}))


def _evaluator(lm, requests, **kw):
    ev = Evaluator(_cfg(**kw), lm, WeightWriter(lm.model), requests)
    ev.downstream = DownstreamEval(lm, [(TOY, _toy_examples(6))], batch_size=3, gen_tokens=2)
    return ev


def _delta(lm, step):
    p = dict(lm.model.named_parameters())[PARAM]
    g = torch.Generator().manual_seed(step)
    return Delta(params={PARAM: torch.randn(p.shape, generator=g) * 1e-3})


@pytest.mark.parametrize("tiny", ["tiny-gpt2"], indirect=True)
def test_distance_on_a_known_delta(tiny):
    weights = WeightWriter(tiny.model)
    w0 = dict(tiny.model.named_parameters())[PARAM].detach().clone()
    d = torch.zeros_like(w0)
    d[0, :4] = torch.tensor([3.0, 4.0, 0.0, 12.0])  # ‖d‖_F = 13
    weights.apply(Delta(params={PARAM: d}))
    ev = Evaluator(_cfg(forget_every=0, downstream_every=0), tiny, weights, [])
    m = ev.distance_metrics()
    assert m[f"distance/{PARAM}"] == pytest.approx(13 / w0.numel())
    assert m[f"distance/relative/{PARAM}"] == pytest.approx(13 / float(w0.norm()))
    assert m["distance/mean"] == m[f"distance/{PARAM}"]


def _run(ev, lm, steps, batch=1, log=None):
    log = {} if log is None else log
    for prev in steps:
        now = min(prev + batch, ev.n_edits)
        ev.weights.apply(_delta(lm, now))
        log[now] = ev.after_step(prev, now, ev.requests[prev:now])[0]
    return log


@pytest.mark.parametrize("tiny", ["tiny-gpt2"], indirect=True)
def test_schedule_fires_at_zero_multiples_and_last(tiny, requests):
    ev = _evaluator(tiny, requests)
    base = ev.baseline()
    assert "downstream/toy/f1_lik" in base and not any(k.startswith(("forget/", "distance/")) for k in base)
    log = _run(ev, tiny, range(0, 10))
    fired = {ns: [n for n, m in log.items() if any(k.startswith(ns) for k in m)]
             for ns in ("forget/", "downstream/", "distance/", "edit/")}
    assert fired["forget/"] == [3, 6, 9, 10]
    assert fired["downstream/"] == [4, 8, 10]
    assert fired["distance/"] == fired["edit/"] == list(range(1, 11))
    assert log[9]["forget/n_earlier"] == 8  # edits of earlier steps only
    # steps of 3 edits: a step that crosses a multiple fires
    ev = _evaluator(tiny, requests)
    log = _run(ev, tiny, range(0, 10, 3), batch=3)
    assert [n for n, m in log.items() if "downstream/mean_f1_gen" in m] == [6, 9, 10]
    assert [n for n, m in log.items() if "forget/frac" in m] == [6, 9, 10]  # at 3 no earlier step exists


@pytest.mark.parametrize("tiny", ["tiny-gpt2"], indirect=True)
def test_resume_continues_exactly(tiny, requests):
    ev = _evaluator(tiny, requests)
    ev.baseline()
    _run(ev, tiny, range(0, 5))
    state = copy.deepcopy(ev.state_dict())
    cumulative = {n: c.clone() for n, c in ev.weights.cumulative.items()}
    straight = _run(ev, tiny, range(5, 10))

    ev.weights.reset()
    fresh = _evaluator(tiny, requests)
    fresh.weights.restore(cumulative)
    fresh.load_state_dict(state)
    resumed = _run(fresh, tiny, range(5, 10))
    assert resumed == straight
    assert fresh.summary() == ev.summary()
    assert fresh.forget_history() == ev.forget_history()
    assert set(ev.summary()) == {"collapse/onset", "collapse/disabling", "collapse/n_disabling"}


@pytest.mark.parametrize("tiny", ["tiny-gpt2"], indirect=True)
def test_confirm_disabling_applies_the_edit_alone_and_restores(tiny, requests):
    ev = Evaluator(_cfg(forget_every=0, downstream_every=0), tiny, WeightWriter(tiny.model), requests)
    ev.weights.apply(_delta(tiny, 1))
    before = dict(tiny.model.named_parameters())[PARAM].detach().clone()
    ev.history["distance"] = [(e, 1e-6 * e + (1.0 if e >= 6 else 0.0)) for e in range(1, 11)]
    assert [d["edit"] for d in ev.disabling()] == [6]
    assert ev.disabling()[0]["case_ids"] == [requests[5].case_id]

    class Editor:
        def apply(self, lm, reqs):
            assert [r.case_id for r in reqs] == [requests[5].case_id]
            assert torch.equal(dict(lm.model.named_parameters())[PARAM], ev.weights.base[PARAM])  # unedited
            d = torch.zeros_like(before)
            d[0, 0] = 1.0 * before.numel()  # distance 1.0 per element, like the jump in the run
            return Delta(params={PARAM: d})

    out = ev.confirm_disabling(Editor)["collapse/confirmed"]
    assert len(out) == 1 and out[0]["disables"] is True and out[0]["ratio"] > 100
    assert torch.equal(dict(tiny.model.named_parameters())[PARAM], before)
