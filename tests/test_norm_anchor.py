"""Norm-anchor scaling (``method.norm_anchor=true``, editlab.methods.norm_anchor) on tiny models:
ν is the trimmed mean of the cached ‖v*‖ sample, every anchored v* has norm ν, an edit past the
bound is a failed edit the stream goes on from, and off changes nothing; one real edit stream on
SmolLM2 (slow)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import compose
from safetensors import safe_open
from test_rome_memit import make

from editlab.checkpoint import hashed_config
from editlab.errors import EditFailed
from editlab.methods import EditorContext, build_editor
from editlab.methods import keyed as keyed_mod
from editlab.methods.norm_anchor import draw, mlp_values, trimmed_mean
from editlab.methods.zopt import optimize_targets

ON = ("method.norm_anchor=true", "method.norm_anchor_samples=8")


def test_trimmed_mean_drops_the_largest_floor_share():
    values = [3.0, 100.0, 1.0, 2.0, 50.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert trimmed_mean(values, 0.05) == pytest.approx(sum(values) / 10)  # floor(0.5) = 0 dropped
    assert trimmed_mean(values, 0.2) == pytest.approx((1 + 2 + 3 + 4 + 5 + 6 + 7 + 8) / 8)  # 100 and 50 dropped
    assert trimmed_mean(values, 0.29) == pytest.approx((1 + 2 + 3 + 4 + 5 + 6 + 7 + 8) / 8)  # floor(2.9) = 2
    with pytest.raises(ValueError, match="drops all"):
        trimmed_mean([1.0], 1.0)
    pool = list(range(20))
    assert draw(pool, 5) == draw(pool, 5) and len(set(draw(pool, 5))) == 5 and draw(pool, 30) == pool


def test_nu_is_the_trimmed_mean_of_a_cached_sample(tmp_path, data_root, monkeypatch):
    _, editor, _ = make("tiny-gpt2", "memit", tmp_path, *ON, "method.norm_anchor_trim=0.25")
    files = list((tmp_path / "norm_anchor").glob("*.safetensors"))
    assert len(files) == 1
    with safe_open(files[0], "pt") as f:
        meta, norms = f.metadata(), f.get_tensor("vstar_norms").tolist()
    assert meta["model_id"] == "tiny:gpt2:0" and meta["layer"] == str(editor.hp.layers[-1])
    assert meta["n_samples"] == "8" and meta["seed"] == "0" and "counterfact" in meta["pool"]
    assert json.loads(meta["search"])["v_lr"] == editor.hp.v_lr
    # by hand: sort the 8 norms, drop floor(0.25·8) = 2 largest, average the rest
    kept = sorted(norms)[:6]
    assert len(norms) == 8 and len(set(norms)) == 8
    assert editor.anchor.nu == pytest.approx(math.fsum(kept) / 6, rel=1e-12)

    def boom(*a, **k):
        raise AssertionError("‖v*‖ sample recomputed although cached")

    monkeypatch.setattr(keyed_mod, "vstar_norms", boom)
    _, again, _ = make("tiny-gpt2", "memit", tmp_path, *ON, "method.norm_anchor_trim=0.25")  # read from disk
    assert again.anchor.nu == editor.anchor.nu
    # the trim is applied on load: another trim reads the same file
    _, untrimmed, _ = make("tiny-gpt2", "memit", tmp_path, *ON, "method.norm_anchor_trim=0")
    assert untrimmed.anchor.nu == pytest.approx(math.fsum(norms) / 8, rel=1e-12)
    assert len(list((tmp_path / "norm_anchor").glob("*.safetensors"))) == 1


@pytest.mark.parametrize("model, method", [("tiny-llama", "memit"), ("tiny-gpt2", "rome"), ("tiny-llama", "encore")])
def test_anchored_vstar_has_norm_nu_and_keeps_the_rest_of_the_target(model, method, tmp_path, data_root):
    lm, editor, requests = make(model, method, tmp_path, *ON, n=2)
    module, layer = editor.search_site(lm)
    # the same search the editor runs, unanchored (it is deterministic)
    raw = optimize_targets(lm, requests, editor.templates, module, layer, editor.hp, fast=editor.fast,
                           bf16=editor.hp.v_bf16, **editor.target_options())
    v0 = mlp_values(lm, requests, raw, module, layer)
    nu = editor.anchor.nu
    editor.anchor.skip_factor = 1e9  # whatever these two edits' norms, this test wants them rescaled
    got = editor.anchored(lm, requests, raw)
    for r, g, v in zip(raw, got, v0):
        v_star = v + r.delta
        target = g.target.double()
        expected = (r.target_init - v).double() + v_star.double() * (nu / float(v_star.norm()))
        assert torch.allclose(target, expected, rtol=1e-6, atol=1e-7)
        assert float((target - (r.target_init - v).double()).norm()) == pytest.approx(nu, rel=1e-5)
        assert g.info["norm_anchor_vstar_norm"] == pytest.approx(float(v_star.norm()))
        assert g.info["norm_anchor_nu"] == nu
    if method == "rome":  # v0 is the searched module's own output: the target is v* itself
        assert float(got[0].target.norm()) == pytest.approx(nu, rel=1e-5)
    delta = editor.apply(lm, requests[:1])
    assert delta.info["norm_anchor_nu"] == nu


def test_edit_past_the_bound_is_a_failed_edit_and_the_stream_goes_on(tmp_path, data_root):
    lm, editor, requests = make("tiny-gpt2", "memit", tmp_path, *ON, n=1)
    editor.anchor.nu = 1e-6  # every v* is far beyond 2·ν
    with pytest.raises(EditFailed, match=r"norm anchor: ‖v\*‖ = .* > 2·ν .*case_id"):
        editor.apply(lm, requests)

    from editlab.run import run

    # skip factor 1: the edits whose ‖v*‖ is above ν (about half) fail, the others are made
    cfg = compose("model=tiny-gpt2", "method=memit", "sample=1", "sample.n_edits=6", "seed=0", "eval=none",
                  "tracker=none", f"cache_dir={tmp_path}", *ON, "method.norm_anchor_skip_factor=1.0")
    run(cfg, tmp_path / "run")
    failed = json.loads((tmp_path / "run" / "failed_edits.json").read_text())
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    made = [s for s in steps if s.get("edit/failed") == 0]
    assert 0 < len(failed) < 6 and len(made) == 6 - len(failed) and steps[-1]["edit"] == 6
    assert all("EditFailed: norm anchor" in f["reason"] for f in failed)
    assert all(s["method/norm_anchor_vstar_norm"] <= s["method/norm_anchor_nu"] for s in made)


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_off_is_the_method_unchanged(method, tmp_path, data_root):
    deltas = []
    for i, extra in enumerate([(), ("method.norm_anchor=false",)]):
        lm, editor, requests = make("tiny-llama", method, tmp_path / f"c{i}", *extra, n=2)
        assert editor.anchor is None
        d = editor.apply(lm, requests)
        assert not any(k.startswith("norm_anchor") for k in d.info)
        deltas.append(d.params)
    assert not (tmp_path / "c0" / "norm_anchor").exists()
    for name in deltas[0]:
        assert torch.equal(deltas[0][name], deltas[1][name])


@pytest.mark.parametrize("method", ["ft", "grace", "ultraedit"])
def test_norm_anchor_on_a_method_without_vstar_is_a_clear_error(method, tmp_path):
    cfg = compose("model=tiny-gpt2", f"method={method}", "method.norm_anchor=true")
    with pytest.raises(ValueError, match=r"norm_anchor=true: .* alphaedit, emmet, encore, memit, rome"):
        build_editor(cfg.method, cfg.model.name, EditorContext(tmp_path, tmp_path, 0))


@pytest.mark.parametrize("override, message", [("method.norm_anchor_trim=1.0", "norm_anchor_trim"),
                                               ("method.norm_anchor_samples=0", "norm_anchor_samples"),
                                               ("method.norm_anchor_skip_factor=0.5", "skip_factor")])
def test_bad_norm_anchor_settings_fail_before_compute(override, message, tmp_path):
    cfg = compose("model=tiny-gpt2", "method=memit", "method.norm_anchor=true", override)
    with pytest.raises(ValueError, match=message):
        build_editor(cfg.method, cfg.model.name, EditorContext(tmp_path, tmp_path, 0))


def test_rome_bound_is_five_and_older_checkpoints_hash_as_before():
    from editlab.methods import METHODS

    assert METHODS["rome"].Hparams().norm_anchor_skip_factor == 5.0
    assert METHODS["memit"].Hparams().norm_anchor_skip_factor == 2.0
    before = {"method": {"name": "rome", "v_lr": None}, "hparams": {"v_lr": 0.5}}
    for factor in (2.0, 5.0):
        now = {"method": {**before["method"], "norm_anchor": None, "norm_anchor_skip_factor": None},
               "hparams": {**before["hparams"], "norm_anchor": False, "norm_anchor_samples": 1000,
                           "norm_anchor_trim": 0.05, "norm_anchor_skip_factor": factor}}
        assert hashed_config(now) == hashed_config(before)
    on = {"method": before["method"], "hparams": {**before["hparams"], "norm_anchor": True}}
    assert hashed_config(on) != hashed_config(before)


@pytest.mark.slow
def test_anchored_memit_edits_take_on_smollm2(smollm, cache_dir, data_root):
    """Three sequential anchored MEMIT edits (ν from 16 samples) on SmolLM2 still make P(new) > P(true)."""
    from conftest import sequential_efficacy

    cfg = compose("model=smollm2-135m", "method=memit", "method.mom2_n_tokens=20000", *ON[:1],
                  "method.norm_anchor_samples=16")
    es = sequential_efficacy(smollm, cfg, 3, cache_dir, data_root)
    assert sum(es) / len(es) >= 2 / 3, es

