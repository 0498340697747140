"""Downstream GLUE: the paper's prompt formats, data checks, and prefix-cached == uncached."""
import json

import pytest
import torch

from editlab.data.glue import GlueExample, GlueTask, load_task
from editlab.errors import DataError
from editlab.evaluate.downstream import DownstreamEval

GLUE = "glue/paper_subsets/gradual-catastrophic-forgetting"


def test_sst2_prompt_is_the_reference_format(data_root):
    task, ex = load_task(data_root / GLUE, "sst2", 2)
    # glue_eval/sst_eval.py of the paper's code base
    assert task.prefix.startswith("Review : excruciatingly unfunny and pitifully unromantic\nSentiment : negative\n\n")
    assert task.prefix.endswith("Review : fashioning an engrossing entertainment out\nSentiment : positive\n\n")
    assert ex[0].text == "Review : puts a human face on a land most westerners are unfamiliar with . \nSentiment :"
    assert (ex[0].label, ex[0].idx) == (1, 605)


@pytest.mark.parametrize("name,n_shots", [("sst2", 4), ("mrpc", 6), ("rte", 3), ("cola", 6)])
def test_all_tasks_load_balanced_subsets(data_root, name, n_shots):
    task, ex = load_task(data_root / GLUE, name)
    assert len(ex) == 200 and sum(e.label for e in ex) == 100
    assert task.prefix.count(task.marker) == n_shots
    assert all(e.text.endswith(task.marker) for e in ex)


def test_bad_records_are_named(tmp_path):
    records = [{"sentence": "a", "label": 1, "idx": 0}, {"sentence": "b", "idx": 1}]
    (tmp_path / "sst2.json").write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"sst2.json: record 1 has no field 'label'"):
        load_task(tmp_path, "sst2")
    shot = "by far the worst movie of the year"
    (tmp_path / "sst2.json").write_text(json.dumps([{"sentence": shot, "label": 0, "idx": 3}]))
    with pytest.raises(DataError, match="few-shot example"):
        load_task(tmp_path, "sst2")
    with pytest.raises(ValueError, match="unknown task"):
        load_task(tmp_path, "qnli")


TOY = GlueTask("toy", ("sentence",), "Q: good day\nA: yes\n\nQ: bad day\nA: no\n\n",
               lambda r: f"Q: {r['sentence']}\nA:", "A:", (("yes", 1), ("no", 0)))


def _toy_examples(n=11):
    g = torch.Generator().manual_seed(0)
    words = ["sun", "rain", "day", "night", "good", "bad", "very", "not"]
    out = []
    for i in range(n):
        k = int(torch.randint(1, 7, (1,), generator=g))
        s = " ".join(words[int(j)] for j in torch.randint(0, len(words), (k,), generator=g))
        out.append(GlueExample(TOY.template({"sentence": s}), i % 2, i))
    return out


@pytest.mark.parametrize("tiny", ["tiny-gpt2", "tiny-llama"], indirect=True)
def test_prefix_cache_gives_the_uncached_predictions(tiny):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # larger weights than the init, so greedy outputs vary with the input
        for p in tiny.model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    ex = _toy_examples()
    de = DownstreamEval(tiny, [(TOY, ex)], batch_size=4, gen_tokens=4)
    tt = de.tasks[0]
    assert len(tt.prefix) > 0 and all(tt.suffixes)
    cached, uncached = de.predict(tt, use_cache=True), de.predict(tt, use_cache=False)
    assert cached.texts == uncached.texts and cached.gen == uncached.gen and cached.lik == uncached.lik
    torch.testing.assert_close(cached.word_logprobs, uncached.word_logprobs, atol=1e-4, rtol=1e-4)
    assert len(set(cached.texts)) > 1  # the check is not vacuous
    # and both equal Hugging Face's greedy generate on each prompt alone
    for i in range(len(ex)):
        ids = torch.tensor([tt.prefix + tt.suffixes[i]])
        out = tiny.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                  pad_token_id=tiny.tok.pad_token_id)
        assert tiny.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == cached.texts[i]
    m = de.round()
    assert set(m) == {"downstream/toy/f1_gen", "downstream/toy/invalid", "downstream/toy/f1_lik",
                      "downstream/mean_f1_gen", "downstream/mean_f1_lik"}


@pytest.mark.slow
def test_smollm_prefix_cache_matches_uncached(smollm, data_root):
    de = DownstreamEval.from_dir(smollm, data_root / GLUE, ["sst2", "mrpc", "rte", "cola"], 6, batch_size=6)
    for tt in de.tasks:
        assert all(len(w) == 1 for w in tt.words)  # label words are single tokens: scored for free
        a, b = de.predict(tt, use_cache=True), de.predict(tt, use_cache=False)
        assert a.texts == b.texts and a.lik == b.lik
        torch.testing.assert_close(a.word_logprobs, b.word_logprobs, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("tiny", ["tiny-gpt2"], indirect=True)
def test_prompts_longer_than_gpt2_positions_are_a_clear_error(tiny, data_root):
    with pytest.raises(ValueError, match="downstream task mrpc: prompts reach .* 256 positions"):
        DownstreamEval.from_dir(tiny, data_root / GLUE, ["mrpc"], 4)
