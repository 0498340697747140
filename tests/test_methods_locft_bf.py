"""LocFT-BF: breadth-first mini-batch fine-tuning of one located MLP matrix."""
from __future__ import annotations

import pytest
import torch
from conftest import compose, sequential_efficacy
from test_rome_memit import make

from editlab.deltas import WeightWriter


def test_epochs_over_mini_batches_of_the_step(tmp_path, data_root):
    lm, editor, requests = make("tiny-llama", "locft_bf", tmp_path, "method.batch_size=2", "method.epochs=3",
                                "method.early_stop_loss=0", n=4)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    delta = editor.apply(lm, requests)
    # 3 epochs × 2 mini-batches of 2: one Adam step per mini-batch
    assert delta.info["epochs"] == 3 and delta.info["opt_steps"] == 6
    name = lm.table.mlp_out_weight_name(editor.hp.layers[0])
    assert list(delta.params) == [name] and delta.params[name].norm() > 0
    for n, p in lm.model.named_parameters():  # nothing left in the model, nothing else trainable
        assert torch.equal(p, before[n]) and not p.requires_grad


def test_targets_end_with_eos_and_loss_falls(tmp_path, data_root):
    lm, editor, requests = make("tiny-llama", "locft_bf", tmp_path, n=2)
    enc = editor.encode(lm, requests[0])
    assert enc.target[-1] == lm.tok.eos_token_id
    loss0 = float(editor.loss(lm, [editor.encode(lm, r) for r in requests]))
    weights = WeightWriter(lm.model)
    weights.apply(editor.apply(lm, requests))
    assert float(editor.loss(lm, [editor.encode(lm, r) for r in requests])) < loss0
    weights.reset()


def test_same_seed_same_delta_and_step_counter_is_state(tmp_path, data_root):
    deltas = []
    for i in range(2):
        lm, editor, requests = make("tiny-gpt2", "locft_bf", tmp_path / f"c{i}", "method.batch_size=1",
                                    "method.epochs=2", n=3)
        deltas.append(editor.apply(lm, requests).params)
    for name in deltas[0]:
        assert torch.equal(deltas[0][name], deltas[1][name])
    assert editor.state_dict() == {"n_steps": 1}
    editor.load_state_dict({"n_steps": 7})
    assert editor.n_steps == 7


def test_one_matrix_only(tmp_path, data_root):
    with pytest.raises(ValueError, match="exactly one"):
        make("tiny-gpt2", "locft_bf", tmp_path, "method.layers=[0,1]")


@pytest.mark.slow
def test_five_sequential_edits_take_on_smollm2(smollm, cache_dir, data_root):
    cfg = compose("model=smollm2-135m", "method=locft_bf")
    es = sequential_efficacy(smollm, cfg, 5, cache_dir, data_root)
    assert sum(es) / len(es) >= 0.8, es
