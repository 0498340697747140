"""The cached-suffix v*/z replay equals the full-model loop on every architecture family.

Tiny random models of each family in ``editlab.models.arch`` (sliding windows of 5 tokens, shorter
than every byte-level prompt; qwen2/qwen3/gemma2/gemma3_text alternate layer types, gemma3_text
with a rotary embedding per type, gemma2 with logit soft-capping).  The comparison runs in
float64: 20 Adam steps amplify float32 rounding on random tiny models, whose gradients are tiny
(the reference loop in float32 is itself 1e-2 away from the same loop in float64 on tiny llama),
so only float64 can show that the two computations are the same.  Gemma 2 runs in float32: its
float64 attention yields NaN on padded rows (in transformers, with either path).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from editlab.data.requests import EditRequest
from editlab.methods.zopt import CachedSuffix, build_problem, optimize_targets
from editlab.models.arch import ModuleTable
from editlab.models.loading import LoadedModel
from editlab.models.tiny import BUILDERS, build_tiny

HP = SimpleNamespace(v_lr=0.5, v_steps=12, v_weight_decay=0.5, clamp_norm_factor=4.0, kl_factor=0.0625,
                     early_stop_loss=5e-2)
REQUESTS = [
    EditRequest(1, "Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
    EditRequest(2, "Toko Yasuda", "{}, who plays the", "piano", "guitar"),
    EditRequest(3, "Apple A5", "{} was created by", "Google", "Apple"),
]
GROUPS = [["{}"], ["The weather is fine today. {}", "Hi. {}"], ["Once upon a time in a land far away. {}"]]


def tiny_lm(arch: str, dtype=None) -> LoadedModel:
    model, tok = build_tiny(arch, 0)
    dtype = dtype or (torch.float32 if arch == "gemma2" else torch.float64)
    model = model.to(dtype).eval()
    model.requires_grad_(False)
    return LoadedModel(model, tok, ModuleTable(model), f"tiny:{arch}:0")


def edited_module(lm: LoadedModel, kind: str) -> tuple[str, int]:
    """ROME's v* lives at an MLP output projection, MEMIT's z at a block's residual output."""
    if kind == "rome":
        return lm.table.mlp_out_name(1), 1
    return f"{lm.table.spec.layers}.2", 2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("kind", ["rome", "memit"])
def test_fast_targets_equal_full_model_loop(arch, kind):
    lm = tiny_lm(arch)
    module, layer = edited_module(lm, kind)
    full = optimize_targets(lm, REQUESTS, GROUPS, module, layer, HP, fast=False)
    fast = optimize_targets(lm, REQUESTS, GROUPS, module, layer, HP, fast=True)
    for f, r in zip(fast, full):
        assert f.info["v_fast"] == 1.0 and r.info["v_fast"] == 0.0
        assert r.delta.norm() > 0
        assert rel(f.target_init, r.target_init) <= 1e-5
        assert rel(f.target, r.target) <= 1e-5
        assert rel(f.delta, r.delta) <= 1e-5
        assert f.info["v_steps"] == r.info["v_steps"]


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3_text", "qwen2"])
def test_sliding_windows_are_shorter_than_the_prompts(arch):
    """Without this the family tests above could not tell a windowed mask from a full one."""
    lm = tiny_lm(arch)
    ids = torch.tensor([lm.tok("Once upon a time in a land far away. Danielle Darrieux").input_ids])
    windowed = lm.model(ids).logits
    lm.model.config.sliding_window = 4096
    for module in lm.model.modules():  # attention layers keep their own copy of the window
        if getattr(module, "sliding_window", None):
            module.sliding_window = 4096
    assert rel(lm.model(ids).logits, windowed) > 1e-3


def test_replay_gives_each_block_its_own_inputs():
    """gemma3_text's sliding and full layers get different masks and rotary embeddings."""
    lm = tiny_lm("gemma3_text")
    problem = build_problem(lm.tok, REQUESTS[:1], GROUPS)
    module, layer = edited_module(lm, "rome")
    runner = CachedSuffix(lm, problem, module, layer)
    (_, _, sliding), (_, _, full) = runner.calls[0], runner.calls[1]
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])
    assert not torch.equal(sliding["attention_mask"], full["attention_mask"])


def test_replay_that_cannot_be_proven_falls_back_to_the_full_pass(caplog):
    """A head the model does not apply (soft-capping on a llama) makes the δ = 0 check fail:
    the search runs the full pass instead, and says so."""
    lm = tiny_lm("llama")
    lm.model.config.final_logit_softcapping = 0.5  # read by ModuleTable.logits, ignored by Llama
    module, layer = edited_module(lm, "memit")
    got = optimize_targets(lm, REQUESTS[:2], GROUPS, module, layer, HP, fast=True)
    ref = optimize_targets(lm, REQUESTS[:2], GROUPS, module, layer, HP, fast=False)
    assert all(r.info["v_fast"] == 0.0 for r in got)
    assert "replay differs" in caplog.text
    for g, r in zip(got, ref):
        assert torch.equal(g.delta, r.delta)


def test_requests_of_a_step_stop_on_their_own():
    """In one padded pass a request that reaches the stopping loss is frozen there while the
    others go on: each equals its search alone."""
    lm = tiny_lm("llama")
    module, layer = edited_module(lm, "memit")
    first = SimpleNamespace(**{**vars(HP), "v_steps": 1})
    loss0 = sorted(optimize_targets(lm, [r], GROUPS, module, layer, first)[0].info["v_loss"] for r in REQUESTS)
    # the request with the lowest starting loss stops at once, the others search on
    hp = SimpleNamespace(**{**vars(HP), "early_stop_loss": (loss0[0] + loss0[1]) / 2})
    alone = [optimize_targets(lm, [r], GROUPS, module, layer, hp)[0] for r in REQUESTS]
    together = optimize_targets(lm, REQUESTS, GROUPS, module, layer, hp)
    steps = sorted(a.info["v_steps"] for a in alone)
    assert steps[0] == 0 and steps[-1] > 0
    for t, a in zip(together, alone):
        assert t.info["v_steps"] == a.info["v_steps"]
        assert torch.allclose(t.delta, a.delta, rtol=1e-9, atol=1e-12)


def test_bf16_autocast_keeps_delta_and_loss_in_float32():
    lm = tiny_lm("llama", torch.float32)
    module, layer = edited_module(lm, "rome")
    exact = optimize_targets(lm, REQUESTS[:1], GROUPS, module, layer, HP)[0]
    half = optimize_targets(lm, REQUESTS[:1], GROUPS, module, layer, HP, bf16=True)[0]
    assert half.delta.dtype == torch.float32 and torch.isfinite(half.delta).all()
    assert torch.equal(half.target_init, exact.target_init)  # the starting point is the exact model's
    assert not torch.equal(half.delta, exact.delta)  # it did run in bfloat16


def test_scoring_applies_the_models_own_logit_soft_capping():
    """Gemma 2 caps its logits after the head; scoring reads them as the model's forward does."""
    from editlab.evaluate.scoring import encode, target_logits

    lm = tiny_lm("gemma2")
    enc = encode(lm.tok, "The mother tongue of Danielle Darrieux is", "French")
    logits, _, _ = target_logits(lm.model, [enc], lm.tok.pad_token_id)
    ids = torch.tensor([list(enc.prompt + enc.target[:-1])])
    full = lm.model(ids).logits[0, len(enc.prompt) - 1:]
    assert torch.allclose(logits, full, atol=1e-5)
