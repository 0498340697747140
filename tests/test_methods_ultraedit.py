"""UltraEdit checked against its maths on tiny models of every family (GPT-2's transposed
Conv1D, Llama, GPT-J); one turn of ten real edits on SmolLM2 (slow)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import compose

from editlab.checkpoint import join_tensors, split_tensors
from editlab.data import build_requests
from editlab.deltas import WeightWriter
from editlab.evaluate.scoring import encode, score_pairs, target_logits
from editlab.methods import EditorContext, build_editor
from editlab.methods.ultraedit import RunningStats, ultraedit_solve
from editlab.models import load_model

FAMILIES = ["tiny-gpt2", "tiny-llama", "tiny-gptj"]
# The MLP's input projection in each family: a shape other than the output projection's, so
# its features never share the output projection's running statistics.
FC_IN = {"tiny-gpt2": "c_fc", "tiny-llama": "gate_proj", "tiny-gptj": "fc_in"}


def _setup(model: str, cache: Path, *overrides: str, n: int = 6):
    cfg = compose(f"model={model}", "method=ultraedit", *overrides)
    lm = load_model(cfg.model, cache)
    requests = build_requests(cfg.data, cfg.sample)[:n]
    return lm, lambda: _editor(cfg, cache, lm, requests), requests


def _editor(cfg, cache, lm, requests):
    ctx = EditorContext(cache_dir=cache, data_root=Path(cfg.data.root), seed=0)
    editor = build_editor(cfg.method, cfg.model.name, ctx)
    editor.prepare(lm, requests)
    return editor


def _reference_features(lm, names, requests):
    """K and G read the plain way: weights made trainable, outputs kept in the graph, the loss
    built by editlab's scoring (the mean cross-entropy of every target token of the batch)."""
    got = {}
    handles = [lm.table.module(n).register_forward_hook(
        lambda mod, args, out, n=n: got.__setitem__(n, (args[0], out))) for n in names]
    encs = [encode(lm.tok, r.rewrite_prompt, r.target_new) for r in requests]
    rows = [b for b, e in enumerate(encs) for _ in e.target]
    cols = [len(e.prompt) - 1 + j for e in encs for j in range(len(e.target))]
    lm.model.requires_grad_(True)
    try:
        logits, tgt, _ = target_logits(lm.model, encs, lm.tok.pad_token_id)
        grads = torch.autograd.grad(F.cross_entropy(logits, tgt), [got[n][1] for n in names])
    finally:
        lm.model.requires_grad_(False)
        for h in handles:
            h.remove()
    return {n: (got[n][0][rows, cols].detach().float(), g[rows, cols].float()) for n, g in zip(names, grads)}


def test_solve_is_the_ridge_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(9, 5, generator=g) * 3, torch.randn(9, 4, generator=g)
    for ridge in (1.0, 2.5):
        a, b = ultraedit_solve(keys, values, ridge)
        assert a.shape == (4, 9) and b.shape == (5, 9)  # factors [out, n] and [in, n]
        # (KᵀK + ridge·I) ΔW = KᵀV, ΔW [in, out]; the factors give ΔWᵀ in maths orientation
        direct = torch.linalg.solve(keys.T @ keys + ridge * torch.eye(5), keys.T @ values)
        assert torch.allclose((a @ b.T).T, direct, atol=1e-5)


def test_running_stats_are_those_of_every_row_seen():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(m, 6, generator=g) * 5 + 3 for m in (1, 7, 2, 40, 1)]
    stats = RunningStats.empty(6)
    for i, x in enumerate(batches):
        stats = stats.merged(x)
        seen = torch.cat(batches[: i + 1]).double()
        assert stats.n == len(seen)
        assert torch.allclose(stats.mean, seen.mean(0), atol=1e-12)
        expected_std = seen.std(0) if len(seen) > 1 else torch.zeros(6, dtype=torch.float64)
        assert torch.allclose(stats.std, expected_std, atol=1e-12)


@pytest.mark.parametrize("model", FAMILIES)
def test_delta_is_the_formula_on_pre_step_features(model, tmp_path, data_root):
    lm, editor_for, requests = _setup(model, tmp_path, f"method.mlp_modules=[{FC_IN[model]}:0,{FC_IN[model]}:3]")
    editor = editor_for()
    names = editor.modules(lm)
    before = {n: lm.table.module(n).weight.detach().clone() for n in names}
    reference = _reference_features(lm, names, requests)  # every layer from the unedited model
    feats, _ = editor.features(lm, requests)
    for n in names:
        assert torch.allclose(feats[n][0], reference[n][0], atol=1e-6)
        assert torch.allclose(feats[n][1], reference[n][1], atol=1e-6, rtol=1e-4)
    delta = editor.apply(lm, requests)
    assert all(torch.equal(lm.table.module(n).weight, w) for n, w in before.items())  # left as found
    for n, (k, g) in reference.items():
        stats = editor.stats[f"{k.shape[1]}x{g.shape[1]}"]
        z = (torch.cat([k, g], 1).double() - stats.mean) / (stats.std + torch.finfo(torch.float32).eps)
        k_hat, g_hat = z.split([k.shape[1], g.shape[1]], 1)
        v = -editor.hp.lr * (k_hat ** 2).sum(1, keepdim=True) * g_hat
        dw = torch.linalg.solve(k.double().T @ k.double() + torch.eye(k.shape[1], dtype=torch.float64),
                                k.double().T @ v)  # [in, out]: y = x ΔW
        got = lm.table.to_math(delta.params[n + ".weight"]).double()  # [out, in]
        assert got.shape == dw.T.shape
        assert torch.allclose(got, dw.T, atol=1e-3 * dw.abs().max().item())  # float32 solve
    # the statistics of a shape hold every layer of that shape, this step's tokens only
    n_tok = len(next(iter(reference.values()))[0])
    assert sorted(s.n for s in editor.stats.values()) == sorted([2 * n_tok, 2 * n_tok])


@pytest.mark.parametrize("model", FAMILIES)
def test_a_layers_delta_does_not_depend_on_other_layers_edited(model, tmp_path, data_root):
    """Layer 1's update is the same alone and beside layers 0 and 2 of another shape: every
    layer's features come from the same pre-step model, not one edited layer by layer."""
    lm, alone, requests = _setup(model, tmp_path, "method.layers=[1]")
    fc_in = FC_IN[model]
    _, beside, _ = _setup(model, tmp_path, "method.layers=[1]", f"method.mlp_modules=[{fc_in}:0,{fc_in}:2]")
    name = lm.table.mlp_out_weight_name(1)
    d_alone, d_beside = alone().apply(lm, requests), beside().apply(lm, requests)
    assert len(d_beside.params) == 3
    scale = d_alone.params[name].abs().max().item()
    assert torch.allclose(d_alone.params[name], d_beside.params[name], atol=1e-7 * scale)


def test_statistics_span_every_turn_and_the_state_reproduces_the_next_delta(tmp_path, data_root):
    lm, editor_for, requests = _setup("tiny-llama", tmp_path, n=9)
    editor = editor_for()
    turns = [requests[:2], requests[2:5], requests[5:7]]
    weights, seen = WeightWriter(lm.model), {}
    try:
        for turn in turns:
            feats, _ = editor.features(lm, turn)  # what apply will see on the current model
            for k, g in feats.values():
                seen.setdefault(f"{k.shape[1]}x{g.shape[1]}", []).append(torch.cat([k, g], 1))
            weights.apply(editor.apply(lm, turn))
        for key, rows in seen.items():
            rows = torch.cat(rows).double()
            assert editor.stats[key].n == len(rows)
            assert torch.allclose(editor.stats[key].mean, rows.mean(0), atol=1e-6)
            assert torch.allclose(editor.stats[key].std, rows.std(0), atol=1e-6, rtol=1e-5)
        # through the checkpoint's own split into JSON and tensors
        tree, tensors = split_tensors(editor.state_dict(), "editor")
        resumed = editor_for()
        resumed.load_state_dict(join_tensors(tree, tensors))
        nxt = requests[7:9]
        d1, d2 = editor.apply(lm, nxt), resumed.apply(lm, nxt)
        assert d1.params.keys() == d2.params.keys()
        assert all(torch.equal(d1.params[n], d2.params[n]) for n in d1.params)
        fresh = editor_for().apply(lm, nxt)  # without the lifelong statistics the delta differs
        assert not all(torch.equal(d1.params[n], fresh.params[n]) for n in d1.params)
    finally:
        weights.reset()


def test_bad_layers_and_hparams_are_named(tmp_path, data_root):
    for bad, match in [
        ("method.layers=[1,7]", r"ultraedit\.layers: layer 7 is out of range"),
        ("method.mlp_modules=[c_fc:-1]", r"ultraedit\.mlp_modules\[c_fc:-1\]: layer -1 is out of range"),
        ("method.mlp_modules=[gate_proj:0]", r"ultraedit\.mlp_modules\[gate_proj:0\]: module .*gate_proj"),
        ("method.mlp_modules=[c_proj:1]", r"already edited"),
        ("method.lr=0", "lr > 0"), ("method.layers=[1,1]", "repeats"), ("method.layers=[]", "edits nothing"),
        ("method.mlp_modules=[c_fc]", "is not '<name in the MLP>:<layer>'"),
    ]:
        with pytest.raises(ValueError, match=match):
            _setup("tiny-gpt2", tmp_path, bad)[1]()


@pytest.mark.slow
def test_one_turn_of_ten_edits_raises_p_new_on_smollm2(smollm, cache_dir, data_root):
    """With the official lr 1e-6, one turn is a small step: it measured +0.040 nats of mean
    log P(new) (−7.614 → −7.574) and left ES at 0.3.  Asserted: every edit's log P(new) rises."""
    cfg = compose("model=smollm2-135m", "method=ultraedit")
    requests = build_requests(cfg.data, cfg.sample)[:10]
    editor = _editor(cfg, cache_dir, smollm, requests)
    pairs = [(r.rewrite_prompt, r.target_new) for r in requests]
    before = [-s.nll for s in score_pairs(smollm.model, smollm.tok, pairs)]
    weights = WeightWriter(smollm.model)
    try:
        weights.apply(editor.apply(smollm, requests))
        after = [-s.nll for s in score_pairs(smollm.model, smollm.tok, pairs)]
    finally:
        weights.reset()
    gain = sum(after) / len(after) - sum(before) / len(before)
    assert all(a > b for a, b in zip(after, before)), (before, after)
    assert 0.01 < gain < 1.0, gain
