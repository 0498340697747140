"""The ledger rebuilds any edit index; `editlab export` writes a delta file or a full model."""
import json
import shutil

import pytest
import torch
from conftest import compose
from safetensors import safe_open
from safetensors.torch import load_file

from editlab.checkpoint import read_checkpoint
from editlab.config import resolve_hparams
from editlab.deltas import Delta
from editlab.export import ExportError, cumulative_at, main
from editlab.methods.ft import FTEditor, FTHparams
from editlab.run import run

TINY = ("model=tiny-gpt2", "method=ft", "eval=none", "tracker=none", "method.steps=2")
PARAM = "transformer.h.1.mlp.c_proj.weight"


class RankOne(FTEditor):
    """ROME-shaped test editor: one seeded pair of vectors per request, returned as factors."""

    def apply(self, lm, requests):
        w = lm.table.mlp_out_weight(self.hp.layers[0])
        pairs = []
        for r in requests:
            g = torch.Generator().manual_seed(r.case_id)
            pairs.append((torch.randn(w.shape[0], generator=g) * 1e-2, torch.randn(w.shape[1], generator=g)))
        d = sum(torch.outer(a, b) for a, b in pairs)
        return Delta(params={lm.table.mlp_out_weight_name(self.hp.layers[0]): d},
                     factors={lm.table.mlp_out_weight_name(self.hp.layers[0]): pairs})


def rank_one_run(run_dir, monkeypatch, *extra, n=6):
    monkeypatch.setattr("editlab.run.build_editor",
                        lambda cfg, name, ctx: RankOne(resolve_hparams(cfg, name, FTHparams), ctx))
    run(compose(*TINY, f"sample.n_edits={n}", *extra), run_dir)


def keep_only_latest(run_dir):
    """Saved copies of every checkpoint's deltas, then all but the newest removed."""
    root = run_dir / "checkpoints"
    saved = {int(p.name[5:]): read_checkpoint(p).deltas for p in root.glob("ckpt-*")}
    latest = (root / "LATEST").read_text()
    for p in root.glob("ckpt-*"):
        if p.name != latest:
            shutil.rmtree(p)
    return saved


def close(a, b):
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_factor_ledger_rebuilds_every_edit_and_undoes(tmp_path, data_root, monkeypatch):
    rank_one_run(tmp_path, monkeypatch, "checkpoint.every=1", "checkpoint.keep=0", n=6)
    saved = keep_only_latest(tmp_path)
    for e in range(1, 7):
        got, meta = cumulative_at(tmp_path, e)
        assert close(got, saved[e]) and meta["from_checkpoint"] == (6 if e == 6 else 0)
    # undo: the newest checkpoint minus the removed edits' own deltas
    got, meta = cumulative_at(tmp_path, 6, undo=[2, 5])
    want = saved[6][PARAM] - (saved[2][PARAM] - saved[1][PARAM]) - (saved[5][PARAM] - saved[4][PARAM])
    assert torch.allclose(got[PARAM], want, atol=1e-6) and meta["undo"] == [2, 5]
    got, _ = cumulative_at(tmp_path, 4, undo=[1])
    assert torch.allclose(got[PARAM], saved[4][PARAM] - saved[1][PARAM], atol=1e-6)


def test_factor_ledger_is_small(tmp_path, data_root, monkeypatch):
    rank_one_run(tmp_path, monkeypatch, "checkpoint.every=3", n=6)
    shard = next((tmp_path / "ledger").iterdir())
    with safe_open(str(shard), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {f"{e:07d}/{PARAM}/{x}0": (256 if x == "a" else 64, 1) for e in (1, 2, 3) for x in "ab"}


def test_batched_steps_undo_whole_steps_only(tmp_path, data_root, monkeypatch):
    rank_one_run(tmp_path, monkeypatch, "checkpoint.every=2", "sample.batch_size=2", n=6)
    with pytest.raises(ExportError, match=r"edits 3..4 were applied as one step"):
        cumulative_at(tmp_path, 6, undo=[3])
    with pytest.raises(ExportError, match="not a step boundary"):
        cumulative_at(tmp_path, 3)
    got, _ = cumulative_at(tmp_path, 6, undo=[3, 4])
    full, _ = cumulative_at(tmp_path, 6)
    assert not torch.allclose(got[PARAM], full[PARAM])


def test_dense_method_exports_at_kept_checkpoints_only(tmp_path, data_root):
    run(compose(*TINY, "sample.n_edits=4", "checkpoint.every=2"), tmp_path)
    got, _ = cumulative_at(tmp_path, 4)
    assert torch.equal(got[PARAM], read_checkpoint(tmp_path / "checkpoints" / "ckpt-0000004").deltas[PARAM])
    with pytest.raises(ExportError, match="dense_ledger=false.*kept checkpoints \\[2, 4\\]"):
        cumulative_at(tmp_path, 3)
    with pytest.raises(ExportError, match="committed up to edit 4"):
        cumulative_at(tmp_path, 5)


def test_dense_ledger_rebuild_is_bit_exact(tmp_path, data_root):
    run(compose(*TINY, "sample.n_edits=4", "checkpoint.every=1", "checkpoint.keep=0", "checkpoint.dense_ledger=true"),
        tmp_path)
    saved = keep_only_latest(tmp_path)
    for e in (1, 2, 3):
        got, _ = cumulative_at(tmp_path, e)
        assert torch.equal(got[PARAM], saved[e][PARAM])


def test_cli_writes_delta_file_and_full_model(tmp_path, data_root, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    rank_one_run(run_dir, monkeypatch, "checkpoint.every=2", n=4)
    assert main([f"run_dir={run_dir}", "at_edit=3", "undo=[1]", f"out={tmp_path / 'd.safetensors'}"]) == 0
    delta = load_file(tmp_path / "d.safetensors")
    assert close(delta, cumulative_at(run_dir, 3, undo=[1])[0])
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        assert f.metadata()["edit"] == "3" and f.metadata()["model_id"] == "tiny:gpt2:0"

    assert main([f"run_dir={run_dir}", "format=model", f"out={tmp_path / 'model'}"]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from editlab.models import load_model

    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    base = load_model(compose("model=tiny-gpt2").model, tmp_path)
    want = dict(base.model.named_parameters())[PARAM] + cumulative_at(run_dir)[0][PARAM]
    assert torch.equal(dict(edited.named_parameters())[PARAM], want)
    assert AutoTokenizer.from_pretrained(tmp_path / "model")("Paris").input_ids
    assert json.loads((tmp_path / "model" / "editlab_export.json").read_text())["at_edit"] == 4

    assert main([f"run_dir={run_dir}", "out=x", "edit=3"]) == 2
    assert "unknown argument 'edit'" in capsys.readouterr().err
    assert main([f"run_dir={run_dir}"]) == 2
    assert "missing out=" in capsys.readouterr().err
    assert main([f"run_dir={run_dir}", "out=x", "format=gguf"]) == 2
