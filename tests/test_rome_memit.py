"""ROME and MEMIT checked against their maths on tiny models; real edits on SmolLM2 (slow)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose, sequential_efficacy
from safetensors import safe_open

from editlab.data import build_requests
from editlab.deltas import WeightWriter
from editlab.methods import EditorContext, build_editor
from editlab.methods import stats as stats_mod
from editlab.methods.keys import io_at_subject
from editlab.methods.memit import memit_solve
from editlab.models import load_model

TINY = ["tiny-gpt2", "tiny-llama", "tiny-gptj"]


def make(model: str, method: str, cache: Path, *overrides: str, n: int = 3):
    cfg = compose(f"model={model}", f"method={method}", *overrides)
    lm = load_model(cfg.model, cache)
    ctx = EditorContext(cache_dir=cache, data_root=Path(cfg.data.root), seed=cfg.seed)
    editor = build_editor(cfg.method, cfg.model.name, ctx)
    requests = build_requests(cfg.data, cfg.sample)[:n]
    editor.prepare(lm, requests)
    return lm, editor, requests


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("variant", ["original", "r-rome"])
def test_rome_maps_key_to_value_exactly(model, variant, tmp_path, data_root):
    lm, editor, requests = make(model, "rome", tmp_path, f"method.variant={variant}")
    req = requests[0]
    r1, _ = editor.rank_one(lm, req)
    layer = editor.hp.layers[0]
    module = lm.table.mlp_out(layer)
    weights = WeightWriter(lm.model)
    weights.apply(editor.apply(lm, [req]))
    with torch.no_grad():
        out = module(r1.key.float()[None])[0].double()
    # W' k = v*: the equality constraint, to float32 tolerance of the layer's output
    assert torch.allclose(out, r1.value, atol=1e-4 * r1.value.abs().max().item() + 1e-6)
    if variant == "original":
        k_bare, _ = io_at_subject(lm, lm.table.mlp_out_name(layer), [req.prompt], [req.subject])
        assert torch.allclose(k_bare[0].double(), r1.key)
    # the update is rank one and recorded as one factor pair in the parameter's layout
    delta = weights.cumulative[lm.table.mlp_out_weight_name(layer)]
    assert torch.linalg.matrix_rank(delta.double(), rtol=1e-5) == 1


def test_rome_conv1d_orientation(tmp_path, data_root):
    lm, editor, requests = make("tiny-gpt2", "rome", tmp_path)
    delta = editor.apply(lm, requests[:1])
    name = lm.table.mlp_out_weight_name(editor.hp.layers[0])
    (a, b), = delta.factors[name]
    assert delta.params[name].shape == lm.table.mlp_out_weight(editor.hp.layers[0]).shape  # [in, out]
    assert torch.allclose(a @ b.T, delta.params[name], atol=1e-6)


def test_memit_solve_matches_least_squares():
    g = torch.Generator().manual_seed(0)
    d_in, d_out, n, lam = 12, 7, 4, 3.0
    keys = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    resid = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    x = torch.randn(d_in, 50, generator=g, dtype=torch.float64)
    cov = x @ x.T / 50
    r, a = memit_solve(keys, resid, cov, lam)
    delta = r @ a.T
    # argmin ‖Δ K − R‖² + λ tr(Δ C Δᵀ)  ⇔  lstsq of [Kᵀ; √λ C^½] Δᵀ = [Rᵀ; 0]
    evals, evecs = torch.linalg.eigh(cov)
    c_half = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    lhs = torch.cat([keys.T, lam ** 0.5 * c_half])
    rhs = torch.cat([resid.T, torch.zeros(d_in, d_out, dtype=torch.float64)])
    direct = torch.linalg.lstsq(lhs, rhs).solution.T
    assert torch.allclose(delta, direct, atol=1e-9)


@pytest.mark.parametrize("model", TINY)
def test_memit_edits_every_layer_with_its_share(model, tmp_path, data_root):
    lm, editor, requests = make(model, "memit", tmp_path, n=2)
    delta = editor.apply(lm, requests)
    names = [lm.table.mlp_out_weight_name(l) for l in editor.hp.layers]
    assert sorted(delta.params) == sorted(names)
    for name in names:
        (a, b), = delta.factors[name]
        assert torch.allclose(a @ b.T, delta.params[name], atol=1e-5)
        assert torch.isfinite(delta.params[name]).all() and delta.params[name].norm() > 0


@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("method", ["rome", "memit"])
def test_fast_path_matches_reference_passes(model, method, tmp_path, data_root):
    """Whole edits, two requests in one step; float64, as tests/test_fast_path.py explains."""
    lm, editor, requests = make(model, method, tmp_path, n=2)
    lm.model.double()
    editor.fast = False
    slow = editor.apply(lm, requests)
    editor.fast = True
    fast = editor.apply(lm, requests)
    assert fast.info["v_fast"] == 1.0 and slow.info["v_fast"] == 0.0
    for name in slow.params:
        assert torch.allclose(slow.params[name], fast.params[name], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_same_config_and_seed_give_identical_deltas(method, tmp_path, data_root):
    runs = []
    for i in range(2):
        lm, editor, requests = make("tiny-llama", method, tmp_path / f"cache{i}", n=2)
        d = editor.apply(lm, requests)
        runs.append((editor.state_dict()["templates"], d.params))
    assert runs[0][0] == runs[1][0]
    for name in runs[0][1]:
        assert torch.equal(runs[0][1][name], runs[1][1][name])


def test_key_statistics_cached_with_key_in_metadata(tmp_path, data_root, monkeypatch):
    make("tiny-gpt2", "rome", tmp_path)
    files = list((tmp_path / "stats").glob("*.safetensors"))
    assert len(files) == 1
    with safe_open(files[0], "pt") as f:
        meta = f.metadata()
    assert meta["model_id"] == "tiny:gpt2:0" and meta["layer"] == "1" and meta["corpus"] == "wikitext"
    assert meta["n_tokens"] == "2000"

    def boom(*a, **k):
        raise AssertionError("statistics recomputed although cached")

    monkeypatch.setattr(stats_mod, "compute_second_moments", boom)
    make("tiny-gpt2", "rome", tmp_path)  # loads from disk


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.layers=[9]", "out of range"),
        ("method.mom2_n_tokens=20", "singular"),
        ("method.variant=fancy", "variant"),
    ],
)
def test_bad_input_fails_before_editing(override, message, tmp_path, data_root):
    with pytest.raises(ValueError, match=message):
        make("tiny-gpt2", "rome", tmp_path, override)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rome", "memit"])
def test_ten_sequential_edits_take_on_smollm2(method, smollm, cache_dir, data_root):
    # Fewer ROME context templates than the default 21 keep this under a few minutes on 2 CPU
    # cores; the statistics share the cache of `python -m bench rome_layers`.
    extra = ["method.context_templates=[[5,2],[10,2]]"] if method == "rome" else []
    cfg = compose("model=smollm2-135m", f"method={method}", "method.mom2_n_tokens=20000", *extra)
    es = sequential_efficacy(smollm, cfg, 10, cache_dir, data_root)
    assert sum(es) / len(es) >= 0.9, es
