"""EMMET, AlphaEdit and ENCORE (MEMIT descendants) checked against their maths on tiny models;
five real edits each on SmolLM2 (slow)."""
from __future__ import annotations

import pytest
import torch
from conftest import compose, sequential_efficacy
from test_rome_memit import make

from editlab.methods import build_editor
from editlab.methods.alphaedit import alphaedit_solve, null_space_projector
from editlab.methods.emmet import emmet_solve
from editlab.methods.zopt import build_problem, search_deltas


def _capture_solves(editor):
    """Record every layer's (keys, resid, R, A) as the editor solves them."""
    seen = []
    solve = editor.solve

    def spy(layer, keys, resid, lm):
        r, a = solve(layer, keys, resid, lm)
        seen.append((layer, keys.double(), resid.double(), r, a))
        return r, a

    editor.solve = spy
    return seen


def test_emmet_solve_is_equality_constrained_and_falls_back_to_pinv():
    g = torch.Generator().manual_seed(0)
    d_in, d_out, n = 12, 7, 4
    keys = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    resid = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    x = torch.randn(d_in, 50, generator=g, dtype=torch.float64)
    cov = x @ x.T / 50
    r, a, info = emmet_solve(keys, resid, cov, 0.0)
    assert torch.allclose((r @ a.T) @ keys, resid, atol=1e-9) and info["emmet_pinv"] == 0
    # Δ = R (KᵀC⁻¹K + λI)⁻¹ KᵀC⁻¹ written out
    lam = 0.3
    r, a, _ = emmet_solve(keys, resid, cov, lam)
    ci = torch.linalg.inv(cov)
    direct = resid @ torch.linalg.inv(keys.T @ ci @ keys + lam * torch.eye(n, dtype=torch.float64)) @ keys.T @ ci
    assert torch.allclose(r @ a.T, direct, atol=1e-9)
    # two identical keys: the inner matrix is singular, the pseudo-inverse is used and reported
    dup = torch.cat([keys[:, :1], keys[:, :1]], 1)
    r, a, info = emmet_solve(dup, torch.cat([resid[:, :1]] * 2, 1), cov, 0.0)
    assert info["emmet_pinv"] == 1 and torch.isfinite(r @ a.T).all()
    assert torch.allclose((r @ a.T) @ dup[:, :1], resid[:, :1], atol=1e-6)


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_emmet_maps_every_key_of_a_batch_exactly(model, tmp_path, data_root):
    lm, editor, requests = make(model, "emmet", tmp_path, "method.emmet_lambda=0", n=3)
    seen = _capture_solves(editor)
    delta = editor.apply(lm, requests)
    assert len(seen) == len(editor.hp.layers) and delta.info["emmet_pinv"] == 0
    for layer, keys, resid, _, _ in seen:
        upd = lm.table.to_math(delta.params[lm.table.mlp_out_weight_name(layer)]).double()
        # W' k_i = W k_i + r_i for every edit i of the batch, at every edited layer
        assert torch.allclose(upd @ keys, resid, atol=1e-4 * resid.abs().max().item())


def test_alphaedit_update_lies_in_the_null_space():
    g = torch.Generator().manual_seed(1)
    d_in, d_out, n = 10, 6, 3
    basis = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64)).Q
    evals = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 1e-3, 1e-3, 1e-4, 1e-5, 1e-6], dtype=torch.float64)
    cov = basis @ torch.diag(evals) @ basis.T
    proj = null_space_projector(cov, 2e-2)
    assert torch.allclose(proj, basis[:, 5:] @ basis[:, 5:].T, atol=1e-9)
    keys = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    resid = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    past = keys[:, :1] @ keys[:, :1].T
    r, a = alphaedit_solve(keys, resid, proj, past, 10.0)
    delta = r @ a.T
    assert torch.allclose(delta @ basis[:, :5], torch.zeros(d_out, 5, dtype=torch.float64), atol=1e-10)
    # the reference's form: upd = (P(KKᵀ + K_pK_pᵀ) + L2 I)⁻¹ P K Rᵀ, Δ = updᵀ
    upd = torch.linalg.solve(proj @ (keys @ keys.T + past) + 10.0 * torch.eye(d_in, dtype=torch.float64),
                             proj @ keys @ resid.T)
    assert torch.allclose(delta, upd.T, atol=1e-10)


def test_alphaedit_leaves_preserved_keys_outputs_unchanged(tmp_path, data_root):
    # Random tiny models have every eigenvalue below the paper's 2e-2; a threshold inside their
    # spectrum leaves a preserved span to check.
    lm, editor, requests = make("tiny-llama", "alphaedit", tmp_path, "method.nullspace_threshold=2e-3", n=2)
    delta = editor.apply(lm, requests)
    for layer in editor.hp.layers:
        evals, evecs = torch.linalg.eigh(editor.stats.mom2(layer).double())
        kept = evecs[:, evals >= 2e-3]
        assert 0 < kept.shape[1] < len(evals)
        upd = lm.table.to_math(delta.params[lm.table.mlp_out_weight_name(layer)]).double()
        assert upd.norm() > 0
        # ‖Δ k₀‖ ≈ 0 for every k₀ in the preserved span (float32 parameter, so relative to ‖Δ‖)
        assert (upd @ kept).norm() <= 1e-5 * upd.norm()
    # the step's keys join the running K_p K_pᵀ, which survives a state_dict round trip
    state = editor.state_dict()
    assert set(state["past_keys"]) == {str(l) for l in editor.hp.layers}
    fresh = build_editor(compose("model=tiny-llama", "method=alphaedit").method, "tiny-llama", editor.ctx)
    fresh.load_state_dict(state)
    for layer in editor.hp.layers:
        assert torch.equal(fresh.past.moments[layer], editor.past.moments[layer])


def test_encore_stops_once_targets_are_the_argmax(tmp_path, data_root):
    lm, editor, requests = make("tiny-gpt2", "encore", tmp_path, "method.early_stop_loss=0", "method.v_steps=15", n=1)
    problem = build_problem(lm.tok, requests, editor.templates)
    n_t = problem.n_target_reads
    n_reads = len(problem.read_rows)

    class Boosted:
        """A random tiny model cannot make its targets the argmax; this stand-in for the model
        does, at every step, while δ still reaches the loss."""

        target_init = torch.ones(1, 8)

        def logits(self, delta):
            out = torch.zeros(n_reads, lm.model.config.vocab_size) + delta.sum()
            out[torch.arange(n_t), torch.tensor(problem.targets)] += 1e4
            return out

    early, = search_deltas(Boosted(), problem, editor.hp, editor.target_options()["argmax_patience"], False, 0.0)
    full, = search_deltas(Boosted(), problem, editor.hp, 0, False, 0.0)
    assert editor.target_options()["argmax_patience"] == editor.hp.v_argmax_patience == 2
    assert early.info["v_steps"] == 1  # the argmax held at steps 0 and 1
    assert full.info["v_steps"] == 14


def test_key_statistics_are_keyed_by_what_changes_them_alone(tmp_path, data_root):
    """MEMIT with another λ or v_lr, and AlphaEdit and EMMET on MEMIT's layers, load the files MEMIT
    saved: no hyperparameter outside the statistics' own (mom2_corpus/n_tokens/max_len/dtype)
    enters their cache key."""
    make("tiny-gpt2", "memit", tmp_path, n=1)
    saved = sorted((tmp_path / "stats").glob("*.safetensors"))
    assert len(saved) == 2  # layers 1 and 2
    for method, *overrides in (("memit", "method.mom2_update_weight=5", "method.v_lr=0.1"), ("alphaedit",),
                               ("emmet", "method.v_steps=3")):
        make("tiny-gpt2", method, tmp_path, *overrides, n=1)
        assert sorted((tmp_path / "stats").glob("*.safetensors")) == saved, method
    make("tiny-gpt2", "memit", tmp_path, "method.mom2_n_tokens=1500", n=1)
    assert len(list((tmp_path / "stats").glob("*.safetensors"))) == 4  # a statistics field does


def test_encore_solve_constrains_norm_and_keeps_past_keys(tmp_path, data_root):
    lm, editor, requests = make("tiny-llama", "encore", tmp_path, n=2)
    seen = _capture_solves(editor)
    editor.apply(lm, requests[:1])
    layer, keys, resid, r, a = seen[0]
    cov = editor.stats.mom2(layer).double() * editor.hp.mom2_update_weight
    eye = torch.eye(keys.shape[0], dtype=torch.float64)
    direct = resid @ keys.T @ torch.linalg.inv(cov + keys @ keys.T + editor.hp.norm_constraint * eye)
    assert torch.allclose(r @ a.T, direct, atol=1e-8)
    past = editor.past.moments[layer].clone()
    assert torch.allclose(past, keys @ keys.T)
    editor.apply(lm, requests[1:])
    _, keys2, resid2, r2, a2 = seen[len(editor.hp.layers)]
    direct2 = resid2 @ keys2.T @ torch.linalg.inv(cov + past + keys2 @ keys2.T + editor.hp.norm_constraint * eye)
    assert torch.allclose(r2 @ a2.T, direct2, atol=1e-8)


@pytest.mark.slow
@pytest.mark.parametrize("method", [
    "emmet",
    "alphaedit",
    "encore",
])
def test_five_sequential_edits_take_on_smollm2(method, smollm, cache_dir, data_root):
    cfg = compose("model=smollm2-135m", f"method={method}", "method.mom2_n_tokens=20000",
                  "method.context_templates=[[5,2]]")
    es = sequential_efficacy(smollm, cfg, 5, cache_dir, data_root)
    assert sum(es) / len(es) >= 0.8, es
