"""Teacher-forced scoring: ES/PS/NS on a case whose answer is known, batching, errors."""
import math

import pytest
import torch
from torch import nn

from editlab.data.requests import EditRequest
from editlab.evaluate.rewrite import score_requests
from editlab.evaluate.scoring import TargetError, encode, score_pairs, teacher_forced_nll

TINY = ["tiny-gpt2", "tiny-llama", "tiny-gptj"]

REQ = EditRequest(
    case_id=1, subject="Zq", prompt="{} is located in", target_new="xx", target_true="yy",
    paraphrase_prompts=("Zq sits in", "Where is Zq? In"),
    neighborhood_prompts=("Wv is located in", "Wv sits in", "Ab is in"),
)


def constant_head(lm, bias: torch.Tensor) -> None:
    """Make the next-token distribution softmax(bias) at every position, whatever the input."""
    head = nn.Linear(lm.model.config.hidden_size, bias.numel(), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(bias)
    lm.model.lm_head = head
    assert lm.model.get_output_embeddings() is head


def byte_id(ch: str) -> int:
    return ord(ch)  # the tiny models' byte tokenizer maps byte b to id b


@pytest.mark.parametrize("tiny", ["tiny-llama"], indirect=True)
def test_scores_on_a_hand_made_case(tiny):
    bias = torch.zeros(257)
    bias[byte_id("x")], bias[byte_id(" ")] = 3.0, 1.0
    constant_head(tiny, bias)
    logp = torch.log_softmax(bias, -1)
    # Targets are scored as " xx" / " yy": a space token, then two letters.
    nll_new = -float(logp[byte_id(" ")] + 2 * logp[byte_id("x")]) / 3
    nll_true = -float(logp[byte_id(" ")] + 2 * logp[byte_id("y")]) / 3
    mag = math.exp(-nll_new) - math.exp(-nll_true)
    assert mag > 0

    (m,) = score_requests(tiny.model, tiny.tok, [REQ])
    assert (m["es"], m["ps"], m["ns"]) == (1.0, 1.0, 0.0)  # "xx" wins everywhere, also where it should not
    assert m["es_mag"] == pytest.approx(mag, rel=1e-5)
    assert m["ps_mag"] == pytest.approx(mag, rel=1e-5)
    assert m["ns_mag"] == pytest.approx(-mag, rel=1e-5)
    assert m["acc"] == pytest.approx(2 / 3)  # argmax is "x": right on both letters, wrong on the space

    pairs = score_pairs(tiny.model, tiny.tok, [(REQ.rewrite_prompt, "xx"), (REQ.rewrite_prompt, "yy")])
    assert pairs[0].nll == pytest.approx(nll_new, rel=1e-5) and pairs[1].nll == pytest.approx(nll_true, rel=1e-5)

    bias[byte_id("y")] = 5.0  # now the true target wins everywhere
    constant_head(tiny, bias)
    (m,) = score_requests(tiny.model, tiny.tok, [REQ])
    assert (m["es"], m["ps"], m["ns"]) == (0.0, 0.0, 1.0) and m["es_mag"] < 0 < m["ns_mag"]
    assert m["acc"] == 0.0


@pytest.mark.parametrize("tiny", ["tiny-llama"], indirect=True)
def test_fractions_over_prompts(tiny):
    """NS is the fraction of neighborhood prompts on which the true target wins (random model)."""
    per_prompt = score_pairs(tiny.model, tiny.tok, [(p, t) for p in REQ.neighborhood_prompts for t in ("xx", "yy")])
    wins = [per_prompt[2 * i + 1].nll < per_prompt[2 * i].nll for i in range(3)]
    (m,) = score_requests(tiny.model, tiny.tok, [REQ])
    assert m["ns"] == pytest.approx(sum(wins) / 3)


@pytest.mark.parametrize("tiny", TINY, indirect=True)
def test_teacher_forced_nll_matches_a_plain_forward(tiny):
    prompt, target = "The Eiffel Tower is in", "Paris, France"
    enc = encode(tiny.tok, prompt, target)
    ids = torch.tensor([enc.prompt + enc.target])
    logp = torch.log_softmax(tiny.model(ids).logits[0].float(), -1)
    lp = len(enc.prompt)
    steps = [logp[lp - 1 + j, t] for j, t in enumerate(enc.target)]
    expected_nll = -float(sum(steps)) / len(steps)
    expected_acc = sum(int(logp[lp - 1 + j].argmax() == t) for j, t in enumerate(enc.target)) / len(steps)
    (s,) = score_pairs(tiny.model, tiny.tok, [(prompt, target)])
    assert s.nll == pytest.approx(expected_nll, rel=1e-5)
    assert s.token_acc == pytest.approx(expected_acc)



@pytest.mark.parametrize("tiny", ["tiny-gpt2", "tiny-llama"], indirect=True)
def test_editing_loss_weighs_pairs_not_tokens(tiny):
    """The editing loss is the mean over pairs of each pair's per-token NLL (a one-token target
    counts as much as a long one), equal to the scored NLLs, and differentiable."""
    pairs = [("The Eiffel Tower is in", "Paris, France, Europe"), ("A", "b")]
    encs = [encode(tiny.tok, p, t) for p, t in pairs]
    assert len(encs[0].target) > 3 * len(encs[1].target)
    w = tiny.table.mlp_out_weight(1)
    w.requires_grad_(True)
    try:
        loss = teacher_forced_nll(tiny.model, encs, tiny.tok.pad_token_id)
        assert loss.requires_grad
    finally:
        w.requires_grad_(False)
    scored = score_pairs(tiny.model, tiny.tok, pairs)
    assert float(loss.detach()) == pytest.approx(sum(s.nll for s in scored) / 2, rel=1e-5)


@pytest.mark.parametrize("tiny", TINY, indirect=True)
def test_padded_batch_equals_one_by_one(tiny):
    pairs = [
        ("A", "b"),
        ("The mother tongue of Danielle Darrieux is", "French"),
        ("Zq is located in", "a very long target with many tokens"),
        ("Où est la tour Eiffel ?", "à Paris"),
        ("x", "y z"),
    ]
    batched = score_pairs(tiny.model, tiny.tok, pairs, batch_size=64)
    single = [score_pairs(tiny.model, tiny.tok, [p], batch_size=1)[0] for p in pairs]
    for b, s in zip(batched, single):
        assert b.nll == pytest.approx(s.nll, rel=1e-5, abs=1e-6) and b.token_acc == s.token_acc
    small_batches = score_pairs(tiny.model, tiny.tok, pairs, batch_size=2)
    assert [round(s.nll, 5) for s in small_batches] == [round(s.nll, 5) for s in batched]


@pytest.mark.parametrize("tiny", ["tiny-gpt2"], indirect=True)
def test_requests_scored_together_equal_alone(tiny):
    other = EditRequest(case_id=2, subject="Lyon", prompt="The twin city of {} is", target_new="Manila",
                        target_true="Beirut", paraphrase_prompts=("Lyon's twin city is",),
                        neighborhood_prompts=("The twin city of Trieste is",))
    together = score_requests(tiny.model, tiny.tok, [REQ, other])
    alone = [score_requests(tiny.model, tiny.tok, [r])[0] for r in (REQ, other)]
    for t, a in zip(together, alone):
        assert t.keys() == a.keys()
        for k in t:
            assert t[k] == pytest.approx(a[k], rel=1e-4, abs=1e-7), k


@pytest.mark.parametrize("tiny", ["tiny-gpt2"], indirect=True)
def test_absent_prompts_give_absent_metrics(tiny):
    bare = EditRequest(case_id=3, subject="Zq", prompt="{} is in", target_new="a", target_true="b")
    (m,) = score_requests(tiny.model, tiny.tok, [bare])
    assert set(m) == {"es", "es_mag", "acc"}
    (m,) = score_requests(tiny.model, tiny.tok, [REQ], paraphrase=False, neighborhood=False)
    assert set(m) == {"es", "es_mag", "acc"}


@pytest.mark.parametrize("tiny", ["tiny-gpt2"], indirect=True)
@pytest.mark.parametrize("target", ["", "   "])
def test_target_that_tokenizes_to_nothing_is_an_error(tiny, target):
    with pytest.raises(TargetError, match="empty"):
        encode(tiny.tok, "Zq is located in", target)
    with pytest.raises(TargetError):
        score_pairs(tiny.model, tiny.tok, [("Zq is located in", target)])


@pytest.mark.parametrize("tiny", ["tiny-gpt2"], indirect=True)
def test_target_gets_exactly_one_leading_space(tiny):
    enc = encode(tiny.tok, "Zq is located in", "Rome")
    assert tiny.tok.decode(list(enc.target)) == " Rome"
    assert tiny.tok.decode(list(enc.prompt)) == "Zq is located in"
