"""Fluency rounds: the reference's n-gram entropy, seeded top-k sampling, their schedule."""
import dataclasses
import math

import pytest
import torch
from omegaconf import OmegaConf

from editlab.config import EvalConfig
from editlab.data import build_requests
from editlab.deltas import WeightWriter
from editlab.evaluate.evaluator import Evaluator
from editlab.evaluate.fluency import generation_prompts, ngram_entropy, sample_text, text_fluency
from tests.conftest import compose


@pytest.fixture(scope="module")
def requests(data_root):
    cfg = compose("sample.n_edits=10")
    return build_requests(cfg.data, cfg.sample)


def test_ngram_entropy_by_hand():
    assert ngram_entropy("a b a b", 2) == pytest.approx(-(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3))
    assert ngram_entropy("a b a b", 3) == pytest.approx(1.0)  # (a b a), (b a b)
    assert ngram_entropy("one.", 3) == 0.0  # too short for a trigram
    assert text_fluency("a b a b") == pytest.approx((2 / 3 * ngram_entropy("a b a b", 2) + 4 / 3 * 1.0) / 2)
    assert text_fluency("the the the the the the") == 0.0  # a collapsed model's repetition
    assert ngram_entropy("Paris, France", 2) == pytest.approx(1.0)  # punctuation is a word: (Paris ,) (, France)


def test_generation_prompts_come_from_the_stream_in_order(requests):
    assert len(requests[0].generation_prompts) == 10  # CounterFact's original schema has ten
    got = generation_prompts(requests, 12)
    assert got == [*requests[0].generation_prompts, *requests[1].generation_prompts[:2]]
    bare = [dataclasses.replace(r, generation_prompts=()) for r in requests]
    with pytest.raises(ValueError, match="no generation_prompts"):
        generation_prompts(bare, 5)


@pytest.mark.parametrize("tiny", ["tiny-gpt2", "tiny-llama"], indirect=True)
def test_sampling_with_the_cache_is_the_plain_computation(tiny):
    model, tok = tiny.model, tiny.tok
    prompt = "Paris is"  # the tiny tokenizer is byte-level: 8 tokens
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():  # top-1 sampling is greedy decoding, here without any cache
        while ids.shape[1] < 20:
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
    greedy = tok.decode(ids[0], skip_special_tokens=True)
    assert sample_text(model, tok, prompt, 20, 1, torch.Generator().manual_seed(0)) == greedy
    a = sample_text(model, tok, prompt, 30, 5, torch.Generator().manual_seed(1))
    assert a == sample_text(model, tok, prompt, 30, 5, torch.Generator().manual_seed(1))
    assert a != sample_text(model, tok, prompt, 30, 5, torch.Generator().manual_seed(2))


@pytest.mark.parametrize("tiny", ["tiny-gpt2"], indirect=True)
def test_fluency_rounds_fire_on_schedule_and_see_only_the_weights(tiny, requests):
    cfg = OmegaConf.structured(EvalConfig(name="t", forget_every=0, downstream_every=0, distance_every=0,
                                          fluency_every=4, fluency_prompts=2, fluency_tokens=100))
    ev = Evaluator(cfg, tiny, WeightWriter(tiny.model), requests)
    base = ev.baseline()["gen/fluency"]
    assert base > 0
    fired = [now for prev, now in zip(range(10), range(1, 11)) if "gen/fluency" in ev.after_step(
        prev, now, requests[prev:now])[0]]
    assert fired == [4, 8, 10]
    assert ev.fluency.round(tiny.model, tiny.tok)["gen/fluency"] == base  # same prompts, same seed
    p = dict(tiny.model.named_parameters())["transformer.h.1.mlp.c_proj.weight"]
    with torch.no_grad():
        p.mul_(30.0)
    try:
        assert ev.fluency.round(tiny.model, tiny.tok)["gen/fluency"] != base
    finally:
        with torch.no_grad():
            p.div_(30.0)


def test_records_without_generation_prompts_fail_before_the_model_loads(requests, monkeypatch, tmp_path):
    import editlab.run as run_mod

    bare = [dataclasses.replace(r, generation_prompts=()) for r in requests]
    monkeypatch.setattr(run_mod, "build_requests", lambda *a: bare)
    monkeypatch.setattr(run_mod, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    cfg = compose("model=tiny-gpt2", "method=ft", "eval=fast", "tracker=none", "eval.fluency_every=5")
    with pytest.raises(ValueError, match="eval.fluency_every=0"):
        run_mod.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()
