"""Forgetting rounds: batched across facts == each fact scored on its own; the bookkeeping."""
import math

import pytest
import torch

from editlab.data import build_requests
from editlab.evaluate.forgetting import ForgetTracker, fact_scores
from tests.conftest import compose


@pytest.fixture(scope="module")
def requests(data_root):
    cfg = compose("sample.n_edits=16")
    return build_requests(cfg.data, cfg.sample)


def _perturb(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("tiny", ["tiny-gpt2", "tiny-llama"], indirect=True)
def test_batched_round_equals_one_by_one(tiny, requests):
    batched = fact_scores(tiny.model, tiny.tok, requests, paraphrase=True, batch_size=7)
    alone = [fact_scores(tiny.model, tiny.tok, [r], paraphrase=True)[0] for r in requests]
    assert batched == alone
    assert sum(len(f.ps) for f in batched) > len(requests)  # paraphrases were scored


@pytest.mark.parametrize("tiny", ["tiny-gpt2"], indirect=True)
def test_round_counts_forgotten_facts(tiny, requests):
    tr = ForgetTracker(paraphrase=True, batch_size=5)
    for i in range(0, len(requests), 4):  # steps of 4 edits, "edited" by a small perturbation each
        tr.record(tiny.model, tiny.tok, requests[i:i + 4])
        _perturb(tiny.model, i)
    made = tr.made
    now = [fact_scores(tiny.model, tiny.tok, [r])[0] for r in requests[:12]]
    m = tr.round(tiny.model, tiny.tok, requests[:12], now=16)
    eligible = [i for i in range(12) if made[i].es]
    lost = [i for i in eligible if not now[i].es]
    assert m["forget/eligible"] == len(eligible) and m["forget/count"] == len(lost)
    assert m["forget/frac"] == (len(lost) / len(eligible) if eligible else pytest.approx(math.nan, nan_ok=True))
    assert m["forget/retention"] == sum(f.es for f in now) / 12
    held = [(i, j) for i in range(12) for j, h in enumerate(made[i].ps) if h]
    assert m["forget/para_count"] == sum(not now[i].ps[j] for i, j in held)
    assert m["forget/para_retention"] == sum(sum(f.ps) for f in now) / sum(len(f.ps) for f in now)
    assert [tr.forget_at[i] for i in lost] == [16] * len(lost)
    assert all(tr.forget_at[i] is None for i in range(16) if i not in lost)
    assert tr.rounds[0]["es"].tolist() == [f.es for f in now]
    # the state survives a round trip
    tr2 = ForgetTracker()
    tr2.load_state_dict(tr.state_dict())
    assert tr2.made == tr.made and tr2.forget_at == tr.forget_at and len(tr2.rounds) == 1


def test_sample_is_fixed_by_the_seed_alone(caplog):
    a, b = ForgetTracker(sample=5, sample_seed=3), ForgetTracker(sample=5, sample_seed=3)
    first = a.positions(40)
    assert first == b.positions(40) and len(first) == 5 and first == sorted(first)
    assert set(first) <= set(range(40))
    assert ForgetTracker(sample=5, sample_seed=4).positions(40) != first  # the seed picks it
    # a position's rank does not depend on the stream length: a later round's sample drops only
    # positions that newer, higher-ranked ones displace
    later = a.positions(48)
    assert {p for p in later if p < 40} <= set(first)
    assert len(set(later) & set(first)) == 5 - sum(1 for q in later if q >= 40)
    with caplog.at_level("INFO", logger="editlab.evaluate.forgetting"):
        assert a.positions(4) == [0, 1, 2, 3] and a.positions(5) == list(range(5))
    assert sum("scoring them all" in r.message for r in caplog.records) == 1  # said once
    with pytest.raises(ValueError, match="forget_sample"):
        ForgetTracker(sample=-1)


@pytest.mark.parametrize("tiny", ["tiny-gpt2"], indirect=True)
def test_sampled_round_scores_its_subset_with_standard_errors(tiny, requests):
    exact, sampled = ForgetTracker(batch_size=5), ForgetTracker(batch_size=5, sample=5, sample_seed=1)
    for i in range(0, 16, 4):
        exact.record(tiny.model, tiny.tok, requests[i:i + 4])
        sampled.record(tiny.model, tiny.tok, requests[i:i + 4])
        _perturb(tiny.model, i)
    full = exact.round(tiny.model, tiny.tok, requests[:12], now=16)
    m = sampled.round(tiny.model, tiny.tok, requests[:12], now=16)
    idx = sampled.positions(12)
    es = exact.rounds[0]["es"]
    assert sampled.rounds[0]["idx"].tolist() == idx and sampled.rounds[0]["es"].tolist() == es[idx].tolist()
    elig = [i for i in idx if exact.made[i].es]
    lost = [i for i in elig if not es[i]]
    assert m["forget/sampled"] == 5 and m["forget/n_earlier"] == 12 and m["forget/count"] == len(lost)
    assert m["forget/retention"] == sum(es[idx].tolist()) / 5
    p, n = m["forget/retention"], 5
    assert m["forget/retention_se"] == pytest.approx(math.sqrt(p * (1 - p) / n * (12 - n) / 11))
    assert "forget/frac_se" in m and "forget/frac_se" not in full  # exact rounds have no sampling error
    assert [sampled.forget_at[i] for i in lost] == [16] * len(lost)
    assert all(sampled.forget_at[i] is None for i in range(16) if i not in lost)
    # the scored positions survive a checkpoint; checkpoints from before sampling still load
    again = ForgetTracker(sample=5, sample_seed=1)
    again.load_state_dict(sampled.state_dict())
    assert again.rounds[0]["idx"].tolist() == idx
    old = exact.state_dict()
    del old["round_idx"]
    legacy = ForgetTracker()
    legacy.load_state_dict(old)
    assert legacy.rounds[0]["idx"].tolist() == list(range(12))


def test_whole_population_has_no_sampling_error():
    from editlab.evaluate.forgetting import _se

    assert _se(0.3, 10, 10) == 0.0 and _se(0.5, 4, 100) == pytest.approx(math.sqrt(0.25 / 4 * 96 / 99))
