"""Checkpoints: layout, atomicity, identity checks, corrupted and half-written ones, disk full, bad edits."""
import errno
import json
import logging
import math

import numpy as np
import pytest
import torch
from conftest import compose

from editlab import checkpoint as ck
from editlab import errors
from editlab.config import resolve_hparams
from editlab.deltas import Delta, WeightWriter
from editlab.errors import BadEdit, StreamStopped
from editlab.methods.ft import FTEditor, FTHparams
from editlab.run import run

TINY = ("model=tiny-gpt2", "method=ft", "eval=none", "tracker=none", "method.steps=3")


def tiny_run(run_dir, *extra, n=6):
    cfg = compose(*TINY, f"sample.n_edits={n}", f"run_dir={run_dir}", *extra)
    return run(cfg, run_dir)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(recs):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in recs]


# -- pure helpers -------------------------------------------------------------------------------
def test_split_join_roundtrip_any_state_dict():
    state = {"templates": ["{}", "The {}"], "cache": torch.arange(6.0).reshape(2, 3),
             "nested": {"keys": [torch.ones(2), np.arange(3, dtype=np.int64)], "n": 3, "x": 0.5, "t": (1, 2)}}
    js, tensors = ck.split_tensors(state, "editor")
    json.dumps(js)  # everything left is JSON
    back = ck.join_tensors(json.loads(json.dumps(js)), tensors)
    assert back["templates"] == state["templates"] and back["nested"]["n"] == 3 and back["nested"]["t"] == [1, 2]
    assert torch.equal(back["cache"], state["cache"]) and torch.equal(back["nested"]["keys"][0], torch.ones(2))
    assert isinstance(back["nested"]["keys"][1], np.ndarray) and back["nested"]["keys"][1].tolist() == [0, 1, 2]


def test_split_rejects_what_json_cannot_hold():
    with pytest.raises(TypeError, match="editor/codebook.*non-string keys"):
        ck.split_tensors({"codebook": {3: torch.ones(1)}}, "editor")
    with pytest.raises(TypeError, match="editor/fn is a function"):
        ck.split_tensors({"fn": lambda: 0}, "editor")


def test_config_hash_ignores_what_a_resume_may_change():
    a = ck.hashed_config({"run_dir": "/a", "tracker": {"mode": "online"},
                          "stream": {"progress": True, "max_delta_norm": 1.0},
                          "method": {"lr": 1e-3}, "checkpoint": {"every": 5}})
    b = ck.hashed_config({"run_dir": "/b", "tracker": {"mode": "offline"},
                          "stream": {"progress": None, "max_delta_norm": 1.0},
                          "method": {"lr": 1e-3}, "checkpoint": {"every": 50}})
    assert ck.config_hash(a) == ck.config_hash(b)
    c = dict(a, method={"lr": 2e-3})
    assert ck.config_hash(c) != ck.config_hash(a)
    assert "method.lr: 0.001 -> 0.002" in ck.config_diff(a, c)


def test_keys_added_later_hash_as_before_at_their_defaults():
    before = {"eval": {"forget_every": 50}, "method": {"lr": 1e-3}}
    now = {"eval": {"forget_every": 50, "forget_sample": 0, "forget_sample_seed": 0}, "method": {"lr": 1e-3}}
    assert ck.config_hash(ck.hashed_config(now)) == ck.config_hash(ck.hashed_config(before))
    sampled = {"eval": {"forget_every": 50, "forget_sample": 500, "forget_sample_seed": 0}, "method": {"lr": 1e-3}}
    assert ck.config_hash(ck.hashed_config(sampled)) != ck.config_hash(ck.hashed_config(before))


def test_rng_state_roundtrip():
    state = ck.rng_state()
    js, tensors = ck.split_tensors(state, "rng")
    want = (np.random.rand(), torch.rand(1).item())
    np.random.rand(5), torch.rand(5)
    ck.set_rng_state(ck.join_tensors(json.loads(json.dumps(js)), tensors))
    assert (np.random.rand(), torch.rand(1).item()) == want


# -- a run's checkpoints ------------------------------------------------------------------------
def test_layout_metadata_and_pruning(tmp_path, data_root):
    tiny_run(tmp_path, "checkpoint.every=2", "checkpoint.keep=2", n=5)
    root = tmp_path / "checkpoints"
    assert (root / "LATEST").read_text() == "ckpt-0000005"
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "ckpt-0000004", "ckpt-0000005"]
    c = ck.read_checkpoint(root / "ckpt-0000005")
    assert c.edit == 5 and c.state["model_id"] == "tiny:gpt2:0" and c.state["stream"]["n_done"] == 5
    assert list(c.deltas) == ["transformer.h.1.mlp.c_proj.weight"]  # only edited params, never base weights
    from safetensors import safe_open

    with safe_open(str(root / "ckpt-0000005" / "deltas.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["edit"] == "5" and meta["model_id"] == "tiny:gpt2:0" and meta["config_hash"] == c.state["config_hash"]
    assert c.state["metrics"]["bytes"] == (tmp_path / "metrics.jsonl").stat().st_size
    assert sorted(p.name for p in (tmp_path / "ledger").iterdir()) == [
        "steps-0000001-0000002.safetensors", "steps-0000003-0000004.safetensors", "steps-0000005-0000005.safetensors"]


def test_rerun_of_a_finished_run_changes_nothing(tmp_path, data_root):
    tiny_run(tmp_path, "checkpoint.every=2", n=4)
    before = (tmp_path / "metrics.jsonl").read_text()
    summary = tiny_run(tmp_path, "checkpoint.every=2", n=4)
    assert summary["n_edits"] == 4 and (tmp_path / "metrics.jsonl").read_text() == before


def test_foreign_checkpoint_is_refused_unless_forced(tmp_path, data_root):
    tiny_run(tmp_path, "checkpoint.every=2", n=4)
    (tmp_path / "checkpoints" / "LATEST").write_text("ckpt-0000002")  # as if killed after edit 2
    with pytest.raises(errors.CheckpointRefused, match=r"belongs to another run.*hparams.lr: 0.0005 -> 0.001"):
        tiny_run(tmp_path, "checkpoint.every=2", "method.lr=1e-3", n=4)
    with pytest.raises(errors.CheckpointRefused, match=r"base model is 'tiny:gpt2:0', this run's is 'tiny:llama:0'"):
        run(compose("model=tiny-llama", *TINY[1:], "sample.n_edits=4"), tmp_path)
    summary = tiny_run(tmp_path, "checkpoint.every=2", "method.lr=1e-3", "resume=force", n=4)
    assert summary["n_edits"] == 4
    assert [r["edit"] for r in metrics(tmp_path)] == [0, 1, 2, 3, 4]


def test_resume_never_refuses_an_existing_run(tmp_path, data_root):
    tiny_run(tmp_path, n=2)
    with pytest.raises(errors.CheckpointRefused, match="resume=never"):
        tiny_run(tmp_path, "resume=never", n=2)


def test_corrupted_checkpoint_refused_then_forced_falls_back(tmp_path, data_root, caplog):
    tiny_run(tmp_path, "checkpoint.every=2", n=4)
    good = (tmp_path / "checkpoints" / "ckpt-0000002" / "deltas.safetensors").read_bytes()
    bad = tmp_path / "checkpoints" / "ckpt-0000004" / "deltas.safetensors"
    raw = bytearray(bad.read_bytes())
    raw[-3] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(errors.CorruptCheckpoint, match=r"ckpt-0000004.*deltas.safetensors does not match its checksum"):
        tiny_run(tmp_path, "checkpoint.every=2", n=4)
    with caplog.at_level(logging.WARNING):
        tiny_run(tmp_path, "checkpoint.every=2", "resume=force", n=4)
    assert "skipping" in caplog.text and "ckpt-0000004" in caplog.text
    assert [r["edit"] for r in metrics(tmp_path)] == [0, 1, 2, 3, 4]  # edits 3, 4 redone, logged once
    assert (tmp_path / "checkpoints" / "ckpt-0000002" / "deltas.safetensors").read_bytes() == good


def test_half_written_checkpoints_are_ignored_with_a_warning(tmp_path, data_root, caplog):
    tiny_run(tmp_path, "checkpoint.every=2", n=4)
    ref = metrics(tmp_path)
    root = tmp_path / "checkpoints"
    # A kill mid-write leaves a temporary dir; a kill before LATEST moved leaves an uncommitted one.
    (root / ".tmp-ckpt-0000006-123").mkdir()
    (root / ".tmp-ckpt-0000006-123" / "deltas.safetensors").write_bytes(b"\x00" * 10)
    (root / "LATEST").write_text("ckpt-0000002")
    with caplog.at_level(logging.WARNING):
        tiny_run(tmp_path, "checkpoint.every=2", n=4)
    assert ".tmp-ckpt-0000006-123" in caplog.text and "ckpt-0000004: never committed" in caplog.text
    assert comparable(metrics(tmp_path)) == comparable(ref)


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, data_root, monkeypatch):
    real_save, calls = ck.save_file, {"n": 0}

    def failing(tensors, path, metadata=None):
        if "ckpt-0000004" in str(path):
            calls["n"] += 1
            with open(path, "wb") as f:  # a partial file, then the device is full
                f.write(b"\x00" * 16)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", failing)
    with pytest.raises(errors.CheckpointError, match=r"ckpt-0000004 failed.*No space left.*ckpt-0000002\) is intact"):
        tiny_run(tmp_path, "checkpoint.every=2", n=6)
    root = tmp_path / "checkpoints"
    assert calls["n"] == 1 and (root / "LATEST").read_text() == "ckpt-0000002"
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "ckpt-0000002"]  # no temporary leftovers
    assert ck.read_checkpoint(root / "ckpt-0000002").edit == 2  # checksums still match
    monkeypatch.setattr(ck, "save_file", real_save)
    assert tiny_run(tmp_path, "checkpoint.every=2", n=6)["n_edits"] == 6
    assert [r["edit"] for r in metrics(tmp_path)] == list(range(7))


# -- bad edits ------------------------------------------------------------------------------
def nan_editor(monkeypatch, bad_edits):
    """FT-C whose delta turns NaN at the chosen stream positions (1-based)."""

    class NaNFT(FTEditor):
        def prepare(self, lm, requests):
            super().prepare(lm, requests)
            self.position = {r.case_id: i + 1 for i, r in enumerate(requests)}

        def apply(self, lm, requests):
            delta = super().apply(lm, requests)
            if self.position[requests[-1].case_id] in bad_edits:
                delta.params = {k: v * math.nan for k, v in delta.params.items()}
            return delta

    monkeypatch.setattr("editlab.run.build_editor",
                        lambda cfg, name, ctx: NaNFT(resolve_hparams(cfg, name, FTHparams), ctx))


def test_bad_edit_skip_is_recorded_and_not_applied(tmp_path, data_root, monkeypatch):
    nan_editor(monkeypatch, {3})
    summary = tiny_run(tmp_path, "checkpoint.every=2", "stream.on_bad_edit=skip", n=4)
    assert summary["n_failed"] == 1
    recs = metrics(tmp_path)
    assert [r["edit/failed"] for r in recs[1:]] == [0, 0, 1, 0]
    failed = ck.read_checkpoint(tmp_path / "checkpoints" / "ckpt-0000004").state["stream"]["failed"]
    assert failed[0]["edit"] == 3 and "NaN" in failed[0]["reason"]
    assert json.loads((tmp_path / "failed_edits.json").read_text())[0]["edit"] == 3
    deltas = ck.read_checkpoint(tmp_path / "checkpoints" / "ckpt-0000004").deltas
    assert all(torch.isfinite(d).all() for d in deltas.values())
    # the ledger has edits 1, 2 and 4 only: edit 3 never reached the weights
    from editlab.journal import read_steps

    assert [s.last for s in read_steps(tmp_path / "ledger", 4)] == [1, 2, 4]


def test_bad_edit_stop_checkpoints_and_a_skip_resume_continues(tmp_path, data_root, monkeypatch):
    nan_editor(monkeypatch, {3})
    with pytest.raises(StreamStopped, match="NaN"):
        tiny_run(tmp_path, "checkpoint.every=5", "stream.on_bad_edit=stop", n=5)
    c = ck.read_checkpoint(tmp_path / "checkpoints" / "ckpt-0000002")  # the cursor before the bad step
    assert c.state["stream"]["n_done"] == 2 and c.state["stream"]["failed"][0]["edit"] == 3
    assert json.loads((tmp_path / "failed_edits.json").read_text())[0]["edit"] == 3
    assert [r["edit"] for r in metrics(tmp_path)] == [0, 1, 2]
    summary = tiny_run(tmp_path, "checkpoint.every=5", "stream.on_bad_edit=skip", n=5)  # same config hash
    assert summary["n_failed"] == 1 and [r["edit"] for r in metrics(tmp_path)] == list(range(6))


def test_norm_bound_rejects_an_exploding_edit(tmp_path, data_root):
    summary = tiny_run(tmp_path, "stream.max_delta_norm=1e-6", n=2)
    assert summary["n_failed"] == 2
    reasons = json.loads((tmp_path / "failed_edits.json").read_text())
    assert all("stream.max_delta_norm=1e-06" in f["reason"] for f in reasons)
    assert ck.read_checkpoint(tmp_path / "checkpoints" / "ckpt-0000002").deltas == {}


def test_by_default_any_finite_delta_is_applied_and_its_norm_logged(tmp_path, data_root):
    assert compose(*TINY).stream.max_delta_norm is None
    model = torch.nn.Linear(3, 2, bias=False)
    weights = WeightWriter(model)
    huge = torch.full((2, 3), 1e30)  # a disabling edit: measured, not refused
    assert weights.apply(Delta(params={"weight": huge}))["weight"] == pytest.approx(float(huge.norm()))
    with pytest.raises(BadEdit, match="NaN or Inf"):
        weights.apply(Delta(params={"weight": torch.full((2, 3), float("nan"))}))

    tiny_run(tmp_path, n=1)
    logged = {k[len("method/delta_norm/"):]: v for k, v in metrics(tmp_path)[-1].items()
              if k.startswith("method/delta_norm/")}
    applied = ck.read_checkpoint(tmp_path / "checkpoints" / "ckpt-0000001").deltas  # one edit: its delta
    assert logged.keys() == applied.keys() and logged
    assert all(logged[k] == pytest.approx(float(applied[k].norm()), rel=1e-6) for k in logged)
