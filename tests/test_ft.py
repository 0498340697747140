"""FT-C: the L∞ clamp, the anchor and objective switches, and real edits on SmolLM2."""
from pathlib import Path

import pytest
import torch
from conftest import compose

from editlab.data.requests import EditRequest
from editlab.deltas import WeightWriter
from editlab.evaluate.rewrite import score_requests
from editlab.evaluate.scoring import encode
from editlab.methods import EditorContext, build_editor
from editlab.methods.ft import FTHparams

REQUESTS = [
    EditRequest(case_id=1, subject="Danielle Darrieux", prompt="The mother tongue of {} is",
                target_new="English", target_true="French"),
    EditRequest(case_id=2, subject="Lyon", prompt="The twin city of {} is", target_new="Manila", target_true="Beirut"),
    EditRequest(case_id=3, subject="Edwin of Northumbria", prompt="The official religion of {} is",
                target_new="Islam", target_true="Christianity"),
    EditRequest(case_id=4, subject="Toko Yasuda", prompt="{} plays the", target_new="piano", target_true="guitar"),
]
EPS = 1e-3


def editor_for(lm, model_name: str, *overrides: str):
    cfg = compose("method=ft", f"model={model_name}", *overrides)
    ctx = EditorContext(cache_dir=Path("/nonexistent"), data_root=Path("/nonexistent"), seed=0)
    editor = build_editor(cfg.method, model_name, ctx)
    editor.prepare(lm, REQUESTS)
    return editor


def within(w: torch.Tensor, anchor: torch.Tensor, eps: float) -> float:
    """max|w - anchor| beyond eps, allowing only float32 rounding of the clamp's bounds."""
    slack = 2 * torch.finfo(torch.float32).eps * float(anchor.abs().max() + eps)
    return float((w - anchor).abs().max()) - eps - slack


# A large lr makes every step hit the clamp, so the bound is what is being tested.
CLAMPED = (f"method.norm_constraint={EPS}", "method.lr=0.05", "method.steps=4", "method.layers=[1,2]")


@pytest.mark.parametrize("tiny", ["tiny-gpt2", "tiny-llama", "tiny-gptj"], indirect=True)
@pytest.mark.parametrize("anchor", ["edit", "run"])
def test_clamp_holds_exactly_over_several_edits(tiny, anchor):
    name = {"gpt2": "tiny-gpt2", "llama": "tiny-llama", "gptj": "tiny-gptj"}[tiny.model.config.model_type]
    editor = editor_for(tiny, name, *CLAMPED, f"method.anchor={anchor}")
    names = [tiny.table.mlp_out_weight_name(l) for l in (1, 2)]
    params = dict(tiny.model.named_parameters())
    w0 = {n: params[n].detach().clone() for n in names}
    weights = WeightWriter(tiny.model)
    drift = []
    for req in REQUESTS:
        before = {n: params[n].detach().clone() for n in names}
        delta = editor.apply(tiny, [req])
        assert set(delta.params) == set(names)
        for n in names:
            assert torch.equal(params[n], before[n]), "apply must leave the model as it found it"
            assert delta.params[n].shape == params[n].shape  # the parameter's own layout (Conv1D too)
            assert float(delta.params[n].abs().max()) > EPS / 2, "the clamp should be active"
        weights.apply(delta)
        for n in names:
            ref = before[n] if anchor == "edit" else w0[n]
            assert within(params[n], ref, EPS) <= 0, n
        drift.append(max(float((params[n] - w0[n]).abs().max()) for n in names))
    if anchor == "run":
        assert max(drift) <= EPS * (1 + 1e-5)
    else:  # re-centred every edit: drift over the run is not bounded by ε
        assert drift[-1] > 1.5 * EPS


@pytest.mark.parametrize("tiny", ["tiny-llama"], indirect=True)
def test_only_the_configured_matrix_changes(tiny):
    editor = editor_for(tiny, "tiny-llama", "method.layers=[2]")
    delta = editor.apply(tiny, REQUESTS[:1])
    assert list(delta.params) == ["model.layers.2.mlp.down_proj.weight"]
    assert delta.info["steps"] == 25 and delta.info["loss"] > 0


def manual_losses(lm, req: EditRequest) -> tuple[float, float]:
    """Teacher-forced and last-token NLL of target_new, straight from the model's logits."""
    enc = encode(lm.tok, req.rewrite_prompt, req.target_new)
    lp = len(enc.prompt)
    logp = torch.log_softmax(lm.model(torch.tensor([enc.prompt + enc.target])).logits[0].float(), -1)
    tf = -sum(float(logp[lp - 1 + j, t]) for j, t in enumerate(enc.target)) / len(enc.target)
    lt = -sum(float(logp[lp - 1, t]) for t in enc.target) / len(enc.target)
    return tf, lt


@pytest.mark.parametrize("tiny", ["tiny-gpt2", "tiny-llama"], indirect=True)
def test_objective_switch(tiny):
    name = "tiny-gpt2" if tiny.model.config.model_type == "gpt2" else "tiny-llama"
    tf_editor = editor_for(tiny, name)
    lt_editor = editor_for(tiny, name, "method.objective=last_token")
    with torch.no_grad():
        for req in REQUESTS[:2]:
            tf, lt = manual_losses(tiny, req)
            assert float(tf_editor.loss(tiny, [req])) == pytest.approx(tf, rel=1e-5)
            assert float(lt_editor.loss(tiny, [req])) == pytest.approx(lt, rel=1e-5)
            assert tf != pytest.approx(lt)  # multi-token targets: the two objectives differ
        both = [manual_losses(tiny, r)[0] for r in REQUESTS[:2]]
        assert float(tf_editor.loss(tiny, REQUESTS[:2])) == pytest.approx(sum(both) / 2, rel=1e-5)
    d_tf = tf_editor.apply(tiny, REQUESTS[:1]).params
    d_lt = lt_editor.apply(tiny, REQUESTS[:1]).params
    assert any(not torch.equal(d_tf[n], d_lt[n]) for n in d_tf)


@pytest.mark.parametrize("tiny", ["tiny-gpt2"], indirect=True)
def test_early_stop_takes_no_step(tiny):
    editor = editor_for(tiny, "tiny-gpt2", "method.early_stop_loss=1e9")
    delta = editor.apply(tiny, REQUESTS[:1])
    assert delta.info["steps"] == 0
    assert all(float(d.abs().max()) == 0 for d in delta.params.values())


def test_defaults_and_documented_switches():
    hp = FTHparams()
    assert (hp.lr, hp.steps, hp.early_stop_loss, hp.anchor, hp.objective) == (5e-4, 25, 1e-2, "edit", "teacher_forced")


@pytest.mark.parametrize("bad", [
    {"anchor": "start"}, {"objective": "mean"}, {"norm_constraint": 0.0}, {"steps": 0}, {"layers": []},
])
def test_invalid_hparams(bad):
    with pytest.raises(ValueError):
        FTHparams(**bad).validate()


@pytest.mark.parametrize("tiny", ["tiny-llama"], indirect=True)
def test_run_anchor_needs_prepare(tiny):
    cfg = compose("method=ft", "model=tiny-llama", "method.anchor=run")
    editor = build_editor(cfg.method, "tiny-llama", EditorContext(Path("/x"), Path("/x"), 0))
    with pytest.raises(RuntimeError, match="prepare"):
        editor.apply(tiny, REQUESTS[:1])


@pytest.mark.parametrize("tiny", ["tiny-llama"], indirect=True)
def test_out_of_range_layer_fails_in_prepare(tiny):
    with pytest.raises(ValueError, match="out of range"):
        editor_for(tiny, "tiny-llama", "method.layers=[9]")


@pytest.mark.slow
def test_three_ftc_edits_take_on_smollm2(smollm, data_root):
    """With smollm2's per-model defaults, each edited fact is ES-true right after its edit."""
    from editlab.data import build_requests

    cfg = compose("model=smollm2-135m", "method=ft", "sample=1", "sample.n_edits=3")
    requests = build_requests(cfg.data, cfg.sample)
    editor = build_editor(cfg.method, cfg.model.name, EditorContext(Path("/x"), data_root, 0))
    editor.prepare(smollm, requests)
    weights = WeightWriter(smollm.model)
    try:
        for req in requests:
            weights.apply(editor.apply(smollm, [req]))
            (m,) = score_requests(smollm.model, smollm.tok, [req], paraphrase=False, neighborhood=False)
            assert m["es"] == 1.0, (req.case_id, m)
    finally:
        weights.reset()  # the session-scoped model goes back to its base weights
