"""``editlab snapshot``: a copy of a run finished at a checkpoint is the run that asked for that
many edits, and the run it was copied from is left untouched."""
import json

import pytest
import torch
from conftest import compose

from editlab.checkpoint import read_checkpoint
from editlab.run import run
from editlab.snapshot import SnapshotError, main, snapshot

# Forgetting every 2 and downstream every 3, so the checkpoint at 4 falls between downstream
# rounds: the snapshot's end-of-run rounds and summary must still equal a 4-edit run's.
ARGS = ("model=tiny-llama", "method=ft", "method.steps=3", "eval=fast", "eval.forget_every=2",
        "eval.downstream_every=3", "eval.downstream_n=8", "tracker=none", "tracker.plots=false",
        "checkpoint.every=2", "checkpoint.keep=0", "seed=0")


def by_edit(run_dir):
    """metrics.jsonl merged per edit (a later record at an edit adds to it), timings left out."""
    merged = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        merged.setdefault(rec.pop("edit"), {}).update({k: v for k, v in rec.items() if "time" not in k})
    return merged


@pytest.mark.parametrize("at,sparse,skipped", [
    (4, (), "downstream/mean_f1_lik"),
    # new-edit scores and distances every 4: at 2, only a stream ending there takes them
    (2, ("eval.new_edit_every=4", "eval.distance_every=4"), "window5/es"),
])
def test_snapshot_at_a_checkpoint_equals_the_shorter_run(tmp_path, data_root, at, sparse, skipped):
    long_run, short_run, snap = tmp_path / "long", tmp_path / "short", tmp_path / "snap"
    run(compose(*ARGS, *sparse, "sample.n_edits=6"), long_run)
    run(compose(*ARGS, *sparse, f"sample.n_edits={at}"), short_run)
    def files(d):
        return {str(p.relative_to(d)): p.read_bytes() for p in d.rglob("*") if p.is_file()}

    before = files(long_run)

    summary = snapshot(str(long_run), str(snap), at_edit=at)

    assert summary["n_edits"] == at
    got = by_edit(snap)
    assert got == by_edit(short_run)
    # what the 6-edit run skipped at this edit, and a stream ending there measures, was measured
    assert skipped in got[at] and skipped not in by_edit(long_run)[at]
    assert json.loads((snap / "summary.json").read_text()) == json.loads((short_run / "summary.json").read_text())
    assert (json.loads((snap / "forgetting.json").read_text())
            == json.loads((short_run / "forgetting.json").read_text()))
    a = read_checkpoint(snap / "checkpoints" / f"ckpt-{at:07d}").deltas
    b = read_checkpoint(short_run / "checkpoints" / f"ckpt-{at:07d}").deltas
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    # the source run is untouched, and the copy tracks locally whatever the run used
    assert files(long_run) == before
    assert json.loads((snap / "config.json").read_text())["tracker"]["name"] == "none"


def test_snapshot_refuses_what_it_cannot_finish(tmp_path, data_root, capsys):
    src = tmp_path / "src"
    run(compose(*ARGS, "sample.n_edits=2", "eval=none"), src)
    with pytest.raises(SnapshotError, match="no checkpoint at edit 3; kept: \\[2\\]"):
        snapshot(str(src), str(tmp_path / "a"), at_edit=3)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    with pytest.raises(SnapshotError, match="not empty"):
        snapshot(str(src), str(busy))
    (tmp_path / "bare").mkdir()
    assert main([f"run_dir={tmp_path / 'bare'}", f"out={tmp_path / 'b'}"]) == 2
    assert "has no config.json" in capsys.readouterr().err
