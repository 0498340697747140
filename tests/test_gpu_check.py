"""bench.gpu_check without a GPU: it says so and succeeds; its comparison flags what differs; its
split places every block and every module beside the blocks, on every family's layout."""
from __future__ import annotations

import pytest
import torch
from conftest import compose

from bench import gpu_check
from bench.gpu_check import Outcome, compare, split_across
from editlab.models import load_model


def test_without_cuda_it_says_so_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "load_copies", lambda device: pytest.fail("loaded a model without CUDA"))
    assert gpu_check.main([]) == 0
    assert "CUDA is not available" in capsys.readouterr().out


def test_compare_flags_changed_missing_and_extra_tensors():
    d = {"w": torch.ones(3, 2)}
    ref = Outcome(deltas=[d, d], state={"keys": torch.ones(2)}, stats={4: torch.eye(2)})
    assert compare(Outcome(deltas=[d, d], state=dict(ref.state), stats=dict(ref.stats)), ref) == \
        {"delta": 0.0, "state": 0.0, "C": 0.0}
    off = compare(Outcome(deltas=[d, {"w": torch.ones(3, 2) * 1.1}], state=ref.state, stats=ref.stats), ref)
    assert off["delta"] == pytest.approx(0.1)
    assert compare(Outcome(deltas=[d], state=ref.state, stats=ref.stats), ref)["delta"] == float("inf")
    extra = Outcome(deltas=[d, {**d, "v": d["w"]}], state=ref.state, stats=ref.stats)
    assert compare(extra, ref)["delta"] == float("inf")
    assert compare(Outcome(deltas=[d, d], state={}, stats=ref.stats), ref)["state"] == float("inf")


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-gptj", "tiny-llama"])
def test_split_hooks_every_block_and_its_siblings_and_keeps_the_logits(model, tmp_path):
    cfg = compose(f"model={model}").model
    plain, split = load_model(cfg, tmp_path), split_across(load_model(cfg, tmp_path), torch.device("cpu"))
    hooked = {name for name, m in split.model.named_modules() if hasattr(m, "_hf_hook")}
    blocks = {f"{split.table.spec.layers}.{i}" for i in range(split.table.n_layers)}
    assert blocks <= hooked
    # every parameter lies under a hooked module, so each runs where its hook puts its inputs
    assert all(any(n.startswith(h + ".") for h in hooked) for n, _ in split.model.named_parameters())
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    torch.testing.assert_close(split.model(input_ids=ids).logits, plain.model(input_ids=ids).logits, rtol=0, atol=0)
