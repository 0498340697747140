"""GRACE: a codebook adaptor that leaves weights and every input outside its ε-balls untouched."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import compose
from test_rome_memit import make

from editlab.data import build_requests
from editlab.evaluate.rewrite import score_requests
from editlab.methods import EditorContext, build_editor
from editlab.methods.grace import EXPAND, NEW, REPLACE, SPLIT
from editlab.methods.tracing import trace


def _logits(lm, texts):
    out = []
    with torch.no_grad():
        for t in texts:
            ids = lm.tok(t, return_tensors="pt").input_ids.to(lm.device)
            out.append(lm.model(input_ids=ids).logits)
    return out


def _min_distance(lm, editor, text):
    name = lm.table.mlp_out_name(editor.hp.layers[0])
    ids = lm.tok(text, return_tensors="pt").input_ids.to(lm.device)
    with torch.no_grad(), trace(lm.model, inputs=(name,)) as got:
        lm.model(input_ids=ids)
    d = torch.cdist(got["in:" + name][0].float(), editor.keys)  # [T, n]
    return float((d - editor.eps[None]).min())  # < 0: inside some ball


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_outputs_outside_every_ball_are_bitwise_unchanged(model, tmp_path, data_root):
    lm, editor, requests = make(model, "grace", tmp_path, n=4)
    weights = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    others = [requests[3].rewrite_prompt, *requests[0].neighborhood_prompts[:3], "An unrelated sentence."]
    before = _logits(lm, others + [requests[0].rewrite_prompt])
    delta = editor.apply(lm, requests[:2])
    assert delta.params == {} and delta.info["codebook_size"] == 2 and delta.info["value_norm_max"] > 0
    after = _logits(lm, others + [requests[0].rewrite_prompt])
    for text, b, a in zip(others, before, after):
        assert _min_distance(lm, editor, text) > 0, text
        assert torch.equal(a, b), text
    # inside a ball (the edited prompt itself) the adaptor does change the output
    assert not torch.equal(after[-1], before[-1])
    # a batch mixing an edited and an unedited prompt: only the edited row changes
    prompts = [requests[0].rewrite_prompt, requests[3].rewrite_prompt]
    ids = [lm.tok(p).input_ids for p in prompts]
    n = min(map(len, ids))
    batch = torch.tensor([i[:n] for i in ids], device=lm.device)
    with torch.no_grad():
        mixed = lm.model(input_ids=batch).logits
        alone = lm.model(input_ids=batch[1:]).logits
    if _min_distance(lm, editor, lm.tok.decode(batch[1])) > 0:
        assert torch.equal(mixed[1], alone[0])
    for name, p in lm.model.named_parameters():
        assert torch.equal(p, weights[name])  # weights untouched
    editor.close()
    assert all(torch.equal(a, b) for a, b in zip(_logits(lm, [requests[0].rewrite_prompt]), before[-1:]))


def test_codebook_adds_expands_and_splits(tmp_path, data_root):
    lm, editor, requests = make("tiny-llama", "grace", tmp_path, n=2)
    req = requests[0]
    assert editor.edit_one(lm, req)["grace_action"] == NEW
    assert len(editor.keys) == 1 and float(editor.eps[0]) == pytest.approx(editor.hp.eps_init)
    # the same key with the same label: expand (the codebook does not grow)
    assert editor.edit_one(lm, req)["grace_action"] == EXPAND and len(editor.keys) == 1
    # the very same key with a conflicting label: the newer label replaces the entry's
    other = dataclasses.replace(req, target_new=req.target_new + " x")
    assert editor.edit_one(lm, other)["grace_action"] == REPLACE
    assert len(editor.keys) == 1 and editor.labels == [other.target_new]
    # a nearby key (within ε + eps_init) with a conflicting label: both radii become half the distance
    d = float((editor._key_and_output(lm, requests[1])[0] - editor.keys[0]).norm())
    editor.hp.eps_init = d  # just wide enough to reach the new key
    info = editor.edit_one(lm, requests[1])
    assert info["grace_action"] == SPLIT and len(editor.keys) == 2
    assert torch.allclose(editor.eps, torch.full((2,), info["grace_nearest"] / 2))
    assert editor.labels == [other.target_new, requests[1].target_new]


def test_codebook_is_the_state_and_restores_the_edits(tmp_path, data_root):
    lm, editor, requests = make("tiny-llama", "grace", tmp_path, n=2)
    editor.apply(lm, requests)
    edited = _logits(lm, [r.rewrite_prompt for r in requests])
    state = editor.state_dict()
    editor.close()
    cfg = compose("model=tiny-llama", "method=grace")
    fresh = build_editor(cfg.method, cfg.model.name, editor.ctx)
    fresh.prepare(lm, requests)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(_logits(lm, [r.rewrite_prompt for r in requests]), edited))
    fresh.close()
    with pytest.raises(ValueError, match="disagree"):
        fresh.load_state_dict({**state, "labels": state["labels"][:1]})


@pytest.mark.slow
def test_five_sequential_edits_take_on_smollm2(smollm, cache_dir, data_root):
    cfg = compose("model=smollm2-135m", "method=grace")
    editor = build_editor(cfg.method, cfg.model.name, EditorContext(cache_dir=cache_dir, data_root=data_root, seed=0))
    requests = build_requests(cfg.data, cfg.sample)[:5]
    editor.prepare(smollm, requests)
    try:
        for r in requests:
            editor.apply(smollm, [r])
        # GRACE's edits persist: every edit is scored after the last one
        es = [score_requests(smollm.model, smollm.tok, [r], neighborhood=False)[0]["es"] for r in requests]
    finally:
        editor.close()
    assert sum(es) / len(es) >= 0.8, es
