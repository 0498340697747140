"""data=zsre: loading and normalisation, the seeded order, bad records, the token-accuracy metric
(checked by hand), both locality scores, forgetting rounds and an end-to-end run."""
import copy
import functools
import http.server
import json
import logging
import threading

import pytest
import torch
from conftest import compose
from test_stream import by_edit, read_metrics

from editlab.data import build_requests, load_zsre, zsre_order
from editlab.errors import DataError
from editlab.evaluate.forgetting import ForgetTracker
from editlab.evaluate.zsre import METRICS, ZsreScorer

ZSRE = "zsre/zsre_mend_eval_portability_gpt4.json"


@pytest.fixture(scope="module")
def records(data_root):
    return load_zsre(data_root / ZSRE)


def test_the_real_file_normalises(records):
    assert len(records) == 1037
    r = records[0]
    assert (r.case_id, r.subject, r.prompt, r.target_new, r.target_true) == (
        0, "IAAF Combined Events Challenge", "When was the inception of {}?", "2006", "1998")
    assert r.rewrite_prompt == "When was the inception of IAAF Combined Events Challenge?"
    assert r.paraphrase_prompts == ("When was the IAAF Combined Events Challenge launched?",)
    assert r.neighborhood_prompts == ("nq question: what is the name of the last episode of spongebob",)
    assert r.neighborhood_answers == ("The String",) and r.dataset == "zsre"
    for i, r in enumerate(records):
        assert r.case_id == i and r.prompt.count("{}") == 1 and r.subject in r.rewrite_prompt
        assert len(r.paraphrase_prompts) == len(r.neighborhood_prompts) == len(r.neighborhood_answers) == 1


def test_the_order_is_the_file_or_a_seeded_permutation(records):
    def ids(*overrides):
        cfg = compose("data=zsre", *overrides)
        return [r.case_id for r in build_requests(cfg.data, cfg.sample)]

    assert ids("sample.index=0", "sample.n_edits=5") == [0, 1, 2, 3, 4]
    first = ids("sample=1", "sample.n_edits=1037")
    assert sorted(first) == list(range(1037)) and first[:5] == zsre_order(1037, 1)[:5]
    assert first[:5] == [147, 1013, 654, 565, 39]  # random.Random(1).shuffle: fixed by the seed alone
    assert ids("sample=1", "sample.n_edits=5") == first[:5]  # a shorter stream is a prefix
    assert ids("sample=2", "sample.n_edits=5") != first[:5]
    with pytest.raises(DataError, match="only 1037 zsRE records are available, n_edits=1038"):
        ids("sample.n_edits=1038")


# -- bad input ---------------------------------------------------------------------------------

def _record() -> dict:
    return {"subject": "Ann Smith", "src": "Which language does Ann Smith speak?", "pred": "French",
            "rephrase": "What language is spoken by Ann Smith?", "alt": "English", "answers": ["French"],
            "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare", "cond": "x"}


@pytest.mark.parametrize("key,value", [
    ("answers", []), ("answers", KeyError), ("answers", "French"), ("answers", [""]),
    ("rephrase", ["a list"]), ("rephrase", None), ("rephrase", 5),
    ("src", "Which language is spoken here?"), ("alt", "  "), ("loc_ans", KeyError), ("subject", 3),
])
def test_a_bad_record_names_file_record_and_field(tmp_path, key, value):
    bad = copy.deepcopy(_record())
    if value is KeyError:
        del bad[key]
    else:
        bad[key] = value
    file = tmp_path / "zsre.json"
    file.write_text(json.dumps([_record(), bad]))
    with pytest.raises(DataError) as e:
        load_zsre(file)
    msg = str(e.value)
    assert str(file) in msg and "record 1" in msg and repr(key) in msg


@pytest.mark.parametrize("content,match", [("[]", "non-empty JSON list"), ("[1]", "record 0 is not a JSON object"),
                                           ("[{", "not valid JSON")])
def test_a_bad_file(tmp_path, content, match):
    (tmp_path / "zsre.json").write_text(content)
    with pytest.raises(DataError, match=match):
        load_zsre(tmp_path / "zsre.json")


def test_bad_data_fails_before_the_model_loads(tmp_path, monkeypatch):
    import editlab.run

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(editlab.run, "load_model", no_model)
    (tmp_path / "zsre.json").write_text(json.dumps([_record(), {**_record(), "answers": []}]))
    cfg = compose("model=tiny-gpt2", "method=ft", "data=zsre", f"data.root={tmp_path}", "data.zsre=zsre.json",
                  "sample.n_edits=2", "eval=none", "tracker=none")
    with pytest.raises(DataError, match=r"zsre.json: record 1: field 'answers'"):
        editlab.run.run(cfg, tmp_path / "run")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_fetches_only_the_file_the_url_serves(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    (www / "zsre_mend_eval.json").write_text(json.dumps([_record()] * 3))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(www)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/zsre_mend_eval.json"
        base = ("data=zsre", f"data.root={tmp_path / 'data'}", f"data.zsre_url={url}", "data.download=true",
                "sample.n_edits=3")
        cfg = compose(*base)  # the default data.zsre is the subset: the full set never lands under its name
        with pytest.raises(FileNotFoundError, match=r"serves zsre_mend_eval.json \(pass data.zsre=zsre/zsre_mend"):
            build_requests(cfg.data, cfg.sample)
        cfg = compose(*base, "data.zsre=zsre/zsre_mend_eval.json")
        assert len(build_requests(cfg.data, cfg.sample)) == 3
        assert (tmp_path / "data/zsre/zsre_mend_eval.json").exists()
    finally:
        httpd.shutdown()
        httpd.server_close()
    cfg = compose("data=zsre", f"data.root={tmp_path / 'none'}", "data.zsre_url=null", "data.download=true")
    with pytest.raises(FileNotFoundError, match="data.download=true cannot fetch it"):
        build_requests(cfg.data, cfg.sample)


def test_a_counterfact_run_hashes_as_before_zsre_existed():
    """Older checkpoints (whose configs have no zsRE keys) still resume."""
    from omegaconf import OmegaConf

    from editlab.checkpoint import config_hash, hashed_config

    now = OmegaConf.to_container(compose(), resolve=True)
    before = copy.deepcopy(now)
    for key in ("dataset", "zsre", "zsre_url"):
        del before["data"][key]
    assert config_hash(hashed_config(now)) == config_hash(hashed_config(before))
    zsre = OmegaConf.to_container(compose("data=zsre"), resolve=True)
    assert config_hash(hashed_config(zsre)) != config_hash(hashed_config(now))


# -- the metric ----------------------------------------------------------------------------------

def _hand_accuracy(lm, prompt: str, target: str, reference=None) -> tuple[float, list[int]]:
    """Teacher-force prompt + " " + target in one plain forward and count, per target token, whether
    the argmax at the position before it is that token (or ``reference``'s token there)."""
    tok = lm.tok
    p = tok(prompt).input_ids
    full = tok(prompt + " " + target).input_ids
    assert full[:len(p)] == p  # no merge across the seam for these strings
    with torch.no_grad():
        logits = lm.model(torch.tensor([full])).logits[0]
    preds = [int(logits[len(p) - 1 + j].argmax()) for j in range(len(full) - len(p))]
    ref = reference if reference is not None else full[len(p):]
    return sum(a == b for a, b in zip(preds, ref)) / len(ref), preds


@pytest.mark.parametrize("tiny", ["tiny-gpt2"], indirect=True)
def test_token_accuracy_matches_a_hand_computation(tiny, records):
    reqs = records[:6]
    scorer = ZsreScorer(tiny.model, tiny.tok, reqs, batch_size=4)
    before = scorer.score(tiny.model, tiny.tok, reqs)
    nq = []
    for r, m in zip(reqs, before):
        assert set(m) == set(METRICS)
        assert m["rewrite_acc"] == pytest.approx(_hand_accuracy(tiny, r.rewrite_prompt, r.target_new)[0])
        assert m["rephrase_acc"] == pytest.approx(_hand_accuracy(tiny, r.paraphrase_prompts[0], r.target_new)[0])
        assert m["loc_vs_unedited"] == 1.0  # the unedited model agrees with itself
        hand, _ = _hand_accuracy(tiny, r.neighborhood_prompts[0], r.neighborhood_answers[0])
        assert m["loc_vs_nq"] == pytest.approx(hand)
        nq.append(m["loc_vs_nq"])
    assert min(nq) < 1.0  # the NQ answer is not what the unedited (random) model predicts

    base = {name: w.clone() for name, w in tiny.model.named_parameters()}
    try:
        with torch.no_grad():
            w = tiny.model.transformer.h[1].mlp.c_proj.weight
            w.add_(0.5 * torch.randn_like(w))
        after = scorer.score(tiny.model, tiny.tok, reqs)
        for r, m in zip(reqs, after):
            _, unedited = _hand_accuracy_at_base(tiny, base, r)
            hand, _ = _hand_accuracy(tiny, r.neighborhood_prompts[0], r.neighborhood_answers[0], reference=unedited)
            assert m["loc_vs_unedited"] == pytest.approx(hand)
        assert min(m["loc_vs_unedited"] for m in after) < 1.0  # the perturbation moved some prediction
        facts = scorer.facts(tiny.model, tiny.tok, reqs, batch_size=4)
        for f, m in zip(facts, after):
            assert f.acc == pytest.approx(m["rewrite_acc"]) and f.es == (f.acc == 1.0)
            assert f.ps_acc == [pytest.approx(m["rephrase_acc"])] and f.ps == [f.ps_acc[0] == 1.0]
    finally:
        with torch.no_grad():
            for name, w in tiny.model.named_parameters():
                w.copy_(base[name])


def _hand_accuracy_at_base(lm, base, r):
    """The unedited model's argmax tokens on r's NQ answer (weights swapped in and back)."""
    saved = {name: w.clone() for name, w in lm.model.named_parameters()}
    with torch.no_grad():
        for name, w in lm.model.named_parameters():
            w.copy_(base[name])
        out = _hand_accuracy(lm, r.neighborhood_prompts[0], r.neighborhood_answers[0])
        for name, w in lm.model.named_parameters():
            w.copy_(saved[name])
    return out


@pytest.mark.parametrize("tiny", ["tiny-gpt2"], indirect=True)
def test_forgetting_rounds_rescore_with_token_accuracy(tiny, records):
    reqs = records[:4]
    scorer = ZsreScorer(tiny.model, tiny.tok, reqs)
    tracker = ForgetTracker(scorer=scorer.facts)
    tracker.record(tiny.model, tiny.tok, reqs)
    m = tracker.round(tiny.model, tiny.tok, reqs, now=4)
    accs = [s["rewrite_acc"] for s in scorer.score(tiny.model, tiny.tok, reqs)]
    assert m["forget/rewrite_acc"] == pytest.approx(sum(accs) / 4)
    assert m["forget/retention"] == sum(a == 1.0 for a in accs) / 4 and m["forget/count"] == 0
    assert "forget/rephrase_acc" in m


# -- end to end --------------------------------------------------------------------------------

def test_a_zsre_stream_end_to_end(tmp_path, data_root, caplog):
    from editlab.run import run

    cfg = compose("model=tiny-gpt2", "method=ft", "data=zsre", "sample.n_edits=4", "eval=fast", "tracker=none",
                  "eval.forget_every=2", "eval.downstream_every=0", "eval.windows=[2,50]")
    with caplog.at_level(logging.WARNING):
        summary = run(cfg, tmp_path / "run")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text  # Table 3, plots
    assert summary["n_edits"] == 4
    edits = by_edit(read_metrics(tmp_path / "run"))
    acc = [edits[n]["edit/rewrite_acc"] for n in range(1, 5)]
    for n in range(1, 5):
        assert {f"edit/{k}" for k in METRICS} | {f"window2/{k}" for k in METRICS} <= set(edits[n])
        assert "edit/es" not in edits[n] and all(0 <= edits[n][f"edit/{k}"] <= 1 for k in METRICS)
    assert edits[4]["window2/rewrite_acc"] == pytest.approx(sum(acc[2:]) / 2)
    assert edits[4]["window50/rewrite_acc"] == pytest.approx(sum(acc) / 4)
    for n in (2, 4):  # forgetting rounds, by token accuracy
        assert {"forget/frac", "forget/retention", "forget/rewrite_acc", "forget/rephrase_acc"} <= set(edits[n])
    result = json.loads((tmp_path / "run/summary.json").read_text())
    assert result["paper/efficacy_until_collapse"] == pytest.approx(100 * sum(acc) / 4)
    assert "paper/forgetting_pct" in result
    plots = {f.name for f in (tmp_path / "run/plots/tiny-gpt2").iterdir()}
    assert {"zsre.png", "forgetting.png"} <= plots and "rewrite.png" not in plots  # no empty CounterFact figure
    forgetting = json.loads((tmp_path / "run/forgetting.json").read_text())
    assert forgetting["case_ids"] == zsre_order(1037, 1)[:4] and forgetting["rounds"] == [2, 4]


@pytest.mark.slow
def test_a_rome_edit_raises_rewrite_accuracy_on_smollm2(smollm, cache_dir, data_root, records):
    from editlab.deltas import WeightWriter
    from editlab.methods import EditorContext, build_editor

    cfg = compose("model=smollm2-135m", "method=rome", "data=zsre", "method.mom2_n_tokens=20000",
                  "method.context_templates=[[5,2],[10,2]]")
    editor = build_editor(cfg.method, cfg.model.name, EditorContext(cache_dir=cache_dir, data_root=data_root, seed=0))
    reqs = records[:3]
    scorer = ZsreScorer(smollm.model, smollm.tok, reqs)
    editor.prepare(smollm, reqs)
    weights = WeightWriter(smollm.model)
    before, after = [], []
    try:
        for r in reqs:
            before.append(scorer.score(smollm.model, smollm.tok, [r])[0])
            weights.apply(editor.apply(smollm, [r]))
            after.append(scorer.score(smollm.model, smollm.tok, [r])[0])
            weights.reset()
    finally:
        weights.reset()
    # Measured: rewrite 0.2/0.0/0.25 -> 1.0 each, rephrase 0.2/0.0/0.25 -> 0.6/0.67/1.0, locality vs the
    # unedited model 1.0 after each edit, vs the NQ answers 0.0/0.0/0.33 before and after.
    assert all(a["rewrite_acc"] > b["rewrite_acc"] for a, b in zip(after, before)), (before, after)
    assert all(a["rewrite_acc"] == 1.0 for a in after), after
    assert sum(a["rephrase_acc"] for a in after) > sum(b["rephrase_acc"] for b in before), (before, after)
    assert all(b["loc_vs_unedited"] == 1.0 for b in before) and min(a["loc_vs_unedited"] for a in after) >= 0.9
