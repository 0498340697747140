"""End to end: `python -m editlab` on a tiny model writes per-edit metrics to the run dir."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, compose


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def by_edit(records):
    """One merged record per edit (a step may be logged in more than one line)."""
    out = {}
    for r in records:
        out.setdefault(r["edit"], {}).update(r)
    return out


def test_python_m_editlab_end_to_end(tmp_path, data_root):
    run_dir = tmp_path / "run"
    env = {**os.environ, "EDITLAB_DATA": str(data_root), "EDITLAB_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, "-m", "editlab", "model=tiny-gpt2", "method=ft", "sample=1", "sample.n_edits=6",
         "eval=none", "tracker=none", f"run_dir={run_dir}", f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"results in {run_dir}" in out.stdout
    edits = by_edit(read_metrics(run_dir))
    assert sorted(edits) == list(range(7))  # 0 is the unedited model, then one record per edit
    for n in range(1, 7):
        for key in ("edit/es", "edit/ps", "edit/ns", "edit/es_mag", "window5/es", "window50/es", "time/edit_s"):
            assert key in edits[n], (n, key)
        assert 0.0 <= edits[n]["edit/es"] <= 1.0 and edits[n]["time/edit_s"] > 0
    es = [edits[n]["edit/es"] for n in range(1, 7)]
    assert edits[6]["window5/es"] == pytest.approx(sum(es[1:]) / 5)  # the last five edits
    assert edits[6]["window50/es"] == pytest.approx(sum(es) / 6)  # all of them, fewer than 50
    assert edits[3]["window5/es"] == pytest.approx(sum(es[:3]) / 3)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["name"] == "tiny-gpt2" and config["hparams"]["layers"] == [1]


def test_run_in_process_with_batched_steps(tmp_path, data_root):
    from editlab.run import run

    cfg = compose("model=tiny-llama", "method=ft", "sample=2", "sample.n_edits=4", "sample.batch_size=2",
                  "eval=none", "tracker=none", "method.steps=3")
    summary = run(cfg, tmp_path / "run")
    assert summary["n_edits"] == 4
    edits = by_edit(read_metrics(tmp_path / "run"))
    assert sorted(edits) == [0, 2, 4]  # one record per step of two edits
    for n in (2, 4):
        assert {"edit/es", "window5/es", "window50/es", "time/edit_s"} <= set(edits[n])


class Quiet:
    """Editor, evaluator and tracker at once, doing nothing: the test is about the terminal."""

    name = "quiet"
    windows: dict = {}

    def apply(self, *args, **kwargs):
        from editlab.deltas import Delta

        return Delta()

    def baseline(self):
        return {}

    def after_step(self, *args):
        return {}, None

    def log(self, *args):
        pass


class QuietWeights:
    """A weight writer that writes nothing and so measures no norms."""

    def apply(self, delta, span):
        return {}


def test_log_lines_print_above_the_progress_bar(capsys):
    import logging

    from editlab.stream import EditStream

    console = logging.StreamHandler(sys.stderr)  # as Hydra's console handler
    root, level = logging.getLogger(), logging.getLogger().level
    root.addHandler(console)
    root.setLevel(logging.INFO)
    try:
        stream = EditStream(None, Quiet(), [None] * 3, Quiet(), Quiet(), QuietWeights(), progress=True)
        stream.on_step.append(lambda s: logging.getLogger("editlab.checkpoint").info("checkpoint saved"))
        stream.run()
    finally:
        root.removeHandler(console)
        root.setLevel(level)
    err = capsys.readouterr().err
    assert err.count("checkpoint saved") == 3 and "quiet edits" in err
    for before in err.split("checkpoint saved")[:-1]:  # each line starts clear of the bar
        assert before.replace("\r", "\n").rsplit("\n", 1)[-1].strip() == "", repr(before[-120:])
