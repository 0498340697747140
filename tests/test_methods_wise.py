"""WISE: TIES merging, the margin loss, routing between the side and main memories, shards and
merges, the state, and the one-layer check."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import compose
from test_rome_memit import make

from editlab.data import build_requests
from editlab.evaluate.rewrite import score_requests
from editlab.methods import EditorContext, build_editor
from editlab.methods.ties import ties_merge, trim
from editlab.methods.wise import MAIN, margin_loss

UNRELATED = "An unrelated sentence."


def _logits(lm, texts):
    with torch.no_grad():
        return [lm.model(input_ids=lm.tok(t, return_tensors="pt").input_ids.to(lm.device)).logits for t in texts]


def test_ties_merge_against_a_hand_computation():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    a = base + torch.tensor([3.0, -1.0, 0.5, 2.0])
    b = base + torch.tensor([-2.0, -4.0, 0.25, -1.0])
    # density 0.5 keeps 2 of 4 entries by magnitude: τa -> [3, 0, 0, 2], τb -> [-2, -4, 0, 0]
    assert torch.equal(trim(a - base, 0.5), torch.tensor([3.0, 0, 0, 2]))
    # weights 0.5 each: weighted [1.5, 0, 0, 1] and [-1, -2, 0, 0]; elected signs of the sums
    # [0.5, -2, 0, 1] are [+, -, + (a zero sum is +), +]; agreeing entries: a at 0 and 3, b at 1
    # disjoint means: 1.5/0.5 = 3, -2/0.5 = -4, nothing agrees -> 0, 1/0.5 = 2
    merged = ties_merge(base, [a, b], [0.5, 0.5], density=0.5)
    assert torch.allclose(merged, base + torch.tensor([3.0, -4.0, 0.0, 2.0]))
    # unequal weights change the election but a disjoint mean of one model is that model's entry
    merged = ties_merge(base, [a, b], [0.2, 0.8], density=0.5)
    assert torch.allclose(merged, base + torch.tensor([-2.0, -4.0, 0.0, 2.0]))
    # two models agreeing: their weighted mean
    assert torch.allclose(ties_merge(base, [base + 1, base + 3], [0.5, 0.5], 1.0), base + 2)


def test_margin_loss_matches_its_formula():
    d_in, d_out = torch.tensor([25.0, 15.0, 3.0]), torch.tensor([4.0])
    alpha, beta, gamma = 2.0, 20.0, 10.0
    # [d_out - d_in + γ]: [-11, -1, 11] -> mean of positives 11; [d_out - α] = 2; [β - d_in]:
    # [-5, 5, 17] -> 11
    assert float(margin_loss(d_in, d_out, alpha, beta, gamma)) == pytest.approx(11 + 2 + 11)
    # every term satisfied: 0
    assert float(margin_loss(torch.tensor([30.0]), torch.tensor([1.0]), alpha, beta, gamma)) == 0.0


def test_one_layer_only():
    with pytest.raises(ValueError, match="exactly one layer"):
        compose_editor("method.layers=[1,2]")
    with pytest.raises(ValueError, match="multiple of save_freq"):
        compose_editor("method.save_freq=3", "method.merge_freq=4")


def compose_editor(*overrides):
    cfg = compose("model=tiny-llama", "method=wise", *overrides)
    return build_editor(cfg.method, cfg.model.name, EditorContext(cache_dir=None, data_root=None, seed=0))


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama", "tiny-gptj"])
def test_routing_sends_the_edit_to_the_side_memory_and_other_text_to_the_main(model, tmp_path, data_root):
    lm, editor, requests = make(model, "wise", tmp_path, n=2)
    weights = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    req = requests[0]
    before = _logits(lm, [UNRELATED, req.rewrite_prompt])
    delta = editor.apply(lm, [req])
    assert delta.params == {} and delta.info["shards"] == 0 and delta.info["side_distance"] > 0
    assert delta.info["wise_in_scope"] > delta.info["wise_out_scope"]
    assert editor.routes(lm, [req.rewrite_prompt, UNRELATED]) == [0, MAIN]
    after = _logits(lm, [UNRELATED, req.rewrite_prompt])
    assert torch.equal(after[0], before[0])  # the main memory's output, bit for bit
    assert not torch.equal(after[1], before[1])
    # in a padded batch each row is routed as it is alone
    with torch.no_grad():
        enc = lm.tok([req.rewrite_prompt, UNRELATED], return_tensors="pt", padding=True)
        mixed = lm.model(**{k: v.to(lm.device) for k, v in enc.items()}).logits
    for row, text in enumerate([UNRELATED, req.rewrite_prompt][::-1]):
        n = len(lm.tok(text).input_ids)
        alone = _logits(lm, [text])[0][0]
        assert torch.allclose(mixed[row, :n], alone, atol=1e-4), text
    for name, p in lm.model.named_parameters():
        assert torch.equal(p, weights[name])  # weights untouched
    editor.close()
    assert torch.equal(_logits(lm, [req.rewrite_prompt])[0], before[1])


def test_shards_at_save_freq_and_ties_merge_at_merge_freq(tmp_path, data_root):
    lm, editor, requests = make("tiny-llama", "wise", tmp_path, "method.save_freq=2", "method.merge_freq=4",
                                "method.steps=3", n=5)
    counts, in_scope = [], []
    for r in requests[:4]:
        info = editor.apply(lm, [r]).info
        counts.append((info["shards"], info["merges"]))
        in_scope.append(info["wise_in_scope"])
    # saved after edits 2 and 4; at 4 the last two shards are merged into one
    assert counts == [(0, 0), (1, 0), (1, 0), (1, 1)]
    assert len(editor.shards) == 1 and editor.merges == 1
    assert math.isinf(editor.side_act) and torch.equal(editor.side, editor._main)  # W' restarts from W
    # a shard's statistic is the least in-scope distance of its edits; a merge keeps the least
    assert editor.shard_acts == [pytest.approx(min(in_scope))]
    # TIES keeps at most the union of the two trimmed task vectors
    moved = editor.shards[0] - editor._main
    assert 0 < (moved != 0).float().mean() <= 2 * editor.hp.densities
    info = editor.apply(lm, [requests[4]]).info
    assert (info["shards"], info["merges"], info["edits_in_side"]) == (1, 1, 1) and math.isfinite(editor.side_act)


def test_merge_is_the_official_ties_of_the_last_two(tmp_path, data_root):
    lm, editor, requests = make("tiny-llama", "wise", tmp_path, "method.save_freq=1", "method.merge_freq=2",
                                "method.steps=2", n=2)
    editor.apply(lm, [requests[0]])
    first = (editor.shards[0].clone(), editor.shard_acts[0])
    # stop the merge to read the second shard, then merge it by hand
    editor.hp.merge_freq, saved = 10**9, editor.hp.merge_freq
    editor.apply(lm, [requests[1]])
    second = (editor.shards[1].clone(), editor.shard_acts[1])
    editor.hp.merge_freq = saved
    editor._merge_shards()
    expected = ties_merge(editor._main, [first[0], second[0]], [0.5, 0.5], editor.hp.densities)
    assert len(editor.shards) == 1 and torch.equal(editor.shards[0], expected)
    assert editor.shard_acts == [min(first[1], second[1])]


def test_state_round_trip_reproduces_outputs(tmp_path, data_root):
    lm, editor, requests = make("tiny-gpt2", "wise", tmp_path, "method.save_freq=2", "method.merge_freq=4",
                                "method.steps=3", n=4)
    for r in requests[:3]:
        editor.apply(lm, [r])
    state = editor.state_dict()
    texts = [r.rewrite_prompt for r in requests] + [UNRELATED]
    edited = _logits(lm, texts)
    editor.close()
    cfg = compose("model=tiny-gpt2", "method=wise", "method.save_freq=2", "method.merge_freq=4", "method.steps=3")
    fresh = build_editor(cfg.method, cfg.model.name, editor.ctx)
    fresh.prepare(lm, requests)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(_logits(lm, texts), edited))
    # the next edit (which completes and merges a shard) is the same as the uninterrupted run's
    info_b = fresh.apply(lm, [requests[3]]).info
    fresh.close()
    editor.prepare(lm, requests)  # the uninterrupted editor, its router back on the model
    info_a = editor.apply(lm, [requests[3]]).info
    editor.close()
    assert info_a == pytest.approx(info_b, rel=0, abs=0, nan_ok=True) and len(fresh.shards) == len(editor.shards) == 1
    assert torch.equal(fresh.shards[0], editor.shards[0])
    with pytest.raises(ValueError, match="routing statistics"):
        fresh.load_state_dict({**state, "shard_acts": torch.zeros(3)})


@pytest.mark.slow
def test_an_edit_takes_on_smollm2(smollm, cache_dir, data_root):
    cfg = compose("model=smollm2-135m", "method=wise")
    editor = build_editor(cfg.method, cfg.model.name, EditorContext(cache_dir=cache_dir, data_root=data_root, seed=0))
    req = build_requests(cfg.data, cfg.sample)[0]
    editor.prepare(smollm, [req])
    try:
        assert score_requests(smollm.model, smollm.tok, [req], neighborhood=False)[0]["es"] == 0
        editor.apply(smollm, [req])
        assert editor.routes(smollm, [req.rewrite_prompt]) == [0]
        # P(new) > P(true) on the edited prompt (measured: P(new) − P(true) −0.001 -> 0.94)
        assert score_requests(smollm.model, smollm.tok, [req], neighborhood=False)[0]["es"] == 1
    finally:
        editor.close()
