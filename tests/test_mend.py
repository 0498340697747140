"""MEND: gradient factorisation, the editor's output, one training step, overlap refusal, CLI."""
import json
from pathlib import Path

import pytest
import torch
from conftest import compose

from editlab.data.requests import EditRequest
from editlab.deltas import WeightWriter
from editlab.evaluate.scoring import encode, teacher_forced_nll
from editlab.mend.data import OverlapError, check_disjoint, evaluated_records, training_records
from editlab.mend.factor import gradient_factors, with_updates
from editlab.mend.net import MENDNet, spec_from_model
from editlab.mend.train import TrainConfig, Trainer, answer_logp, kl_from, locality_facts

TINY = ["tiny-gpt2", "tiny-llama", "tiny-gptj"]
LAYERS = [1, 2, 3]


def records(n: int, start: int = 0) -> list[EditRequest]:
    words = ["Paris", "Rome", "Berlin", "Madrid", "Vienna", "Oslo", "Lima", "Cairo"]
    return [EditRequest(case_id=start + i, subject=f"Subject {start + i}", prompt="{} is located in",
                        target_new=words[i % 8], target_true=words[(i + 3) % 8],
                        paraphrase_prompts=(f"Where is Subject {start + i}? It is in",),
                        neighborhood_prompts=(f"Thing {i} is located in",)) for i in range(n)]


@pytest.mark.parametrize("tiny", TINY, indirect=True)
def test_factorisation_reproduces_weight_gradient(tiny):
    # Two pairs of different lengths: padding positions must not contribute.
    encs = [encode(tiny.tok, "The capital of France is", "Rome city"), encode(tiny.tok, "Hi", "there")]
    loss, factors = gradient_factors(tiny, LAYERS, encs)
    weights = [tiny.table.mlp_out_weight(l) for l in LAYERS]
    try:
        for w in weights:
            w.requires_grad_(True)
        true = torch.autograd.grad(teacher_forced_nll(tiny.model, encs, tiny.tok.pad_token_id), weights)
    finally:
        for w in weights:
            w.requires_grad_(False)
    n_tokens = sum(len(e.prompt) + len(e.target) - 1 for e in encs)
    for l, g in zip(LAYERS, true):
        x, delta = factors[l]
        assert x.shape[0] == delta.shape[0] == n_tokens
        # sum_t delta_t x_t^T in maths orientation; GPT-2's Conv1D parameter is its transpose.
        torch.testing.assert_close(tiny.table.to_param(delta.T @ x), g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tiny", TINY, indirect=True)
def test_hooked_update_equals_weight_change(tiny):
    enc = [encode(tiny.tok, "The capital of France is", "Rome")]
    w = tiny.table.mlp_out_weight(2)
    out_dim, in_dim = tiny.table.to_math(w).shape
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(out_dim, 3, generator=g) * 0.05, torch.randn(in_dim, 3, generator=g) * 0.05
    with torch.no_grad(), with_updates(tiny.table, {2: (a, b)}):
        hooked = teacher_forced_nll(tiny.model, enc, tiny.tok.pad_token_id)
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w += tiny.table.to_param(a @ b.T)
            dense = teacher_forced_nll(tiny.model, enc, tiny.tok.pad_token_id)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    torch.testing.assert_close(hooked, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tiny", TINY, indirect=True)
def test_editor_output_shape_and_rank(tiny):
    net = MENDNet(spec_from_model(tiny.table, LAYERS, rank=8, depth=2, init_lr=1e-3))
    for p in net.parameters():  # a trained-looking network, not the identity it starts as
        torch.nn.init.normal_(p, std=0.1)
    enc = [encode(tiny.tok, "The capital of France is", "Rome")]
    _, factors = gradient_factors(tiny, LAYERS, enc)
    n_tokens = factors[1][0].shape[0]
    for l, (a, b) in net.updates(factors).items():
        out_dim, in_dim = tiny.table.to_math(tiny.table.mlp_out_weight(l)).shape
        assert a.shape == (out_dim, n_tokens) and b.shape == (in_dim, n_tokens)
        dw = a @ b.T
        assert torch.linalg.matrix_rank(dw) <= n_tokens < min(out_dim, in_dim)
        assert dw.abs().sum() > 0


@pytest.mark.parametrize("tiny", ["tiny-gpt2", "tiny-llama"], indirect=True)
def test_editor_delta_is_in_parameter_layout(tiny, tmp_path):
    from editlab.mend.store import save_editor
    from editlab.methods.base import EditorContext
    from editlab.methods.mend import MENDEditor, MENDHparams

    net = MENDNet(spec_from_model(tiny.table, LAYERS, rank=8, depth=1, init_lr=1e-3))
    digest = save_editor(tmp_path / "ed", net, {"model_id": tiny.model_id, "layers": LAYERS})
    ed = MENDEditor(MENDHparams(layers=LAYERS, editor_path=str(tmp_path / "ed")), EditorContext(tmp_path, tmp_path, 0))
    reqs = records(2)
    ed.prepare(tiny, reqs)
    assert ed.hp.editor_sha256 == digest
    delta = ed.apply(tiny, reqs)
    WeightWriter(tiny.model).check(delta)  # shapes match the parameters, factors reproduce the delta
    bad = MENDEditor(MENDHparams(layers=LAYERS, editor_path=str(tmp_path / "ed"), editor_sha256="0" * 64),
                     EditorContext(tmp_path, tmp_path, 0))
    with pytest.raises(ValueError, match="sha256"):
        bad.prepare(tiny, reqs)


@pytest.mark.parametrize("tiny", TINY, indirect=True)
@pytest.mark.parametrize("c_edit", [0.1, 100.0])
def test_one_training_step_lowers_the_loss(tiny, c_edit):
    """One Adam step lowers the MEND objective; with the edit term dominant, the edit loss itself."""
    torch.manual_seed(0)
    cfg = TrainConfig(lr=1e-3, lr_lr=1e-4, rank=16, init_lr=1e-3, c_edit=c_edit)
    net = MENDNet(spec_from_model(tiny.table, LAYERS, cfg.rank, cfg.depth, cfg.init_lr))
    trainer = Trainer(tiny, net, cfg, records(8), [])
    batch, unrelated = records(1), records(1, start=5)
    with torch.no_grad():  # the first step fills the running input statistics; fix them after it
        trainer.losses(batch, unrelated)
    net.freeze_statistics()
    with torch.no_grad():
        before = {k: float(v) for k, v in trainer.losses(batch, unrelated).items()}
    row = trainer.train_step(batch, unrelated)
    with torch.no_grad():
        after = {k: float(v) for k, v in trainer.losses(batch, unrelated).items()}
    assert row["loss"] == pytest.approx(before["loss"], rel=1e-5)
    assert after["loss"] < before["loss"]
    if c_edit > 1:
        assert after["edit"] < before["edit"]


def _cf_file(path: Path, recs: list[EditRequest]) -> Path:
    path.write_text(json.dumps([{"case_id": r.case_id, "subject": r.subject, "prompt": r.rewrite_prompt,
                                 "target_new": r.target_new, "ground_truth": r.target_true,
                                 "rephrase_prompt": r.paraphrase_prompts[0],
                                 "locality_prompt": r.neighborhood_prompts[0]} for r in recs]))
    return path


def test_training_refuses_records_of_evaluation_orders(tmp_path):
    evaluated = _cf_file(tmp_path / "eval.json", records(6))
    orders = tmp_path / "orders.json"
    orders.write_text(json.dumps({"0": [4, 0, 99, 1, 2], "1": [5, 3]}))
    ex = evaluated_records(evaluated, orders, n_edits=2)  # order 1 -> 4, 0; order 2 -> 5, 3
    assert ex.case_ids == {0, 3, 4, 5}
    train_file = _cf_file(tmp_path / "train.json", records(8))
    kept = training_records(train_file, ex)
    assert sorted(r.case_id for r in kept) == [1, 2, 6, 7]
    with pytest.raises(OverlapError, match="case_ids 0, 3, 4, 5"):
        check_disjoint(records(8), ex, train_file)
    # A different case_id about an evaluated subject leaks the edit too.
    same_subject = EditRequest(case_id=50, subject="subject 4", prompt="{} is in", target_new="a", target_true="b")
    with pytest.raises(OverlapError):
        check_disjoint([same_subject], ex, train_file)
    assert evaluated_records(evaluated, orders, n_edits=None).case_ids == {0, 1, 2, 3, 4, 5}


def test_paper_orders_are_excluded_from_the_train_split(data_root):
    cf = compose("model=tiny-gpt2", "method=mend").data
    ex = evaluated_records(data_root / cf.counterfact, data_root / cf.sample_orders, n_edits=None)
    train_file = data_root / TrainConfig.train_file
    from editlab.data import load_counterfact

    raw = list(load_counterfact(train_file).values())
    with pytest.raises(OverlapError):  # the raw split does overlap the evaluated records
        check_disjoint(raw, ex, train_file)
    kept = training_records(train_file, ex)
    check_disjoint(kept, ex, train_file)
    assert 0 < len(kept) < len(raw)


def test_train_command_checkpoints_resumes_and_runs_in_the_stream(data_root, tmp_path, cache_dir):
    from editlab.mend.train import main
    from editlab.run import run

    out = tmp_path / "editor"
    common = ["model=tiny-gpt2", f"cache_dir={cache_dir}", f"mend.out_dir={out}", "mend.rank=8",
              "mend.save_every=2", "mend.val_every=2", "mend.n_val=2", "mend.exclude_n_edits=20"]
    assert main([*common, "mend.steps=2"]) == 0
    assert {"editor.safetensors", "config.json", "train_state.pt", "history.jsonl", "curve.png"} <= {
        p.name for p in out.iterdir()}
    assert main([*common, "mend.steps=4"]) == 0  # resumes at step 2
    steps = [json.loads(l)["step"] for l in (out / "history.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]
    assert json.loads((out / "config.json").read_text())["step"] == 4
    assert main([*common, "mend.steps=4", "mend.rank=4"]) == 2  # a foreign checkpoint is refused

    cfg = compose("model=tiny-gpt2", "method=mend", f"method.editor_path={out}", "sample.n_edits=3",
                  "eval=none", "tracker=none", f"cache_dir={cache_dir}")
    run(cfg, tmp_path / "run")
    hp = json.loads((tmp_path / "run" / "config.json").read_text())["hparams"]
    assert hp["editor_path"] == str(out.resolve()) and len(hp["editor_sha256"]) == 64
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 4



def test_train_command_takes_the_reference_depth_for_a_model_without_a_row(data_root, tmp_path, cache_dir):
    from editlab.mend.train import main

    out = tmp_path / "editor"
    assert main(["model=tiny-llama", "model.name=tiny-mystery", f"cache_dir={cache_dir}", f"mend.out_dir={out}",
                 "mend.rank=4", "mend.steps=1", "mend.val_every=1", "mend.n_val=1", "mend.exclude_n_edits=20"]) == 0
    assert json.loads((out / "config.json").read_text())["spec"]["layers"] == [1, 2, 3]  # gpt2-xl's 45-47 of 48

@pytest.mark.parametrize("tiny", ["tiny-gpt2"], indirect=True)
def test_locality_is_read_where_the_unrelated_answers_are_predicted(tiny):
    recs = records(3)
    facts = locality_facts(tiny.tok, recs[:1], recs[1:])
    assert [f.target for f in facts] == [encode(tiny.tok, "x", r.target_true).target for r in recs]
    got = answer_logp(tiny, facts)
    assert got.shape == (sum(len(f.target) for f in facts), tiny.model.config.vocab_size)
    want = []
    with torch.no_grad():
        for f in facts:  # unbatched, full logits: rows from the prompt's last token to the answer's last-but-one
            seq = torch.tensor([list(f.prompt) + list(f.target[:-1])])
            logits = tiny.model(input_ids=seq).logits[0].float()
            want.append(torch.log_softmax(logits[len(f.prompt) - 1:], dim=-1))
    assert torch.allclose(got.detach(), torch.cat(want), atol=1e-5)
    assert float(kl_from(got, got)) == 0.0
