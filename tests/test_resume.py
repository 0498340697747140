"""A stream killed with SIGKILL mid-edit and started again ends exactly as an uninterrupted one."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from editlab.checkpoint import read_checkpoint
from editlab.export import cumulative_at

N = 24
ARGS = ["model=tiny-gpt2", "method=ft", "eval=none", "tracker=none", f"sample.n_edits={N}",
        "checkpoint.every=2", "checkpoint.dense_ledger=true", "seed=0"]


def command(run_dir):
    return [sys.executable, "-m", "editlab", *ARGS, f"run_dir={run_dir}"]


def env():
    # Same thread count in every process: CPU float reductions then agree bit for bit.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def last_edit(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return -1
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
    return json.loads(lines[-1])["edit"] if lines else -1


def final_deltas(run_dir, n=N):
    c = read_checkpoint(run_dir / "checkpoints" / (run_dir / "checkpoints" / "LATEST").read_text())
    assert c.edit == n
    return c.deltas


def test_sigkill_mid_stream_then_resume_matches_uninterrupted(tmp_path, data_root):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(command(ref), env=env(), check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(command(killed), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while last_edit(killed) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the stream ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = last_edit(killed)
    assert 5 <= at_kill < N
    latest = (killed / "checkpoints" / "LATEST").read_text()

    subprocess.run(command(killed), env=env(), check=True, capture_output=True, timeout=600)
    got, want = records(killed), records(ref)
    # no metric step logged twice, none missing, and the same values (timings aside)
    assert [r["edit"] for r in got] == list(range(N + 1))
    strip = lambda rs: [{k: v for k, v in r.items() if "time" not in k} for r in rs]  # noqa: E731
    assert strip(got) == strip(want), f"killed after edit {at_kill}, resumed from {latest}"

    a, b = final_deltas(killed), final_deltas(ref)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6)
    # the ledger holds every edit exactly once: rebuilding from it alone reproduces the deltas
    for run_dir in (killed, ref):
        steps = sorted(p.name for p in (run_dir / "ledger").iterdir())
        assert steps == [f"steps-{i:07d}-{i + 1:07d}.safetensors" for i in range(1, N, 2)]
    for e in (5, 11):
        x, _ = cumulative_at(killed, e)
        y, _ = cumulative_at(ref, e)
        assert all(torch.allclose(x[k], y[k], rtol=0, atol=1e-6) for k in x)


def test_resume_carries_forgetting_and_downstream_history(tmp_path, data_root):
    """Forgetting rounds re-score earlier successes and windows average the last edits: a resume
    from an early checkpoint must give the same later measurements as the uninterrupted run."""
    import shutil

    from conftest import compose

    from editlab.run import run

    # tiny-llama: the few-shot downstream prompts are longer than tiny-gpt2's 256 positions.
    args = ("model=tiny-llama", "method=ft", "method.steps=3", "eval=fast", "eval.forget_every=2",
            "eval.downstream_every=3", "eval.downstream_n=8", "tracker=none", "sample.n_edits=6",
            "checkpoint.every=2", "checkpoint.keep=0")
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    run(compose(*args), ref)
    shutil.copytree(ref, resumed)
    (resumed / "checkpoints" / "LATEST").write_text("ckpt-0000002")  # as if killed after edit 2
    run(compose(*args), resumed)
    strip = lambda rs: [{k: v for k, v in r.items() if "time" not in k} for r in rs]  # noqa: E731
    got, want = records(resumed), records(ref)
    assert any(k.startswith("forget/") for r in want[3:] for k in r)
    assert any(k.startswith("downstream/") for r in want[3:] for k in r)
    assert [r["edit"] for r in got] == list(range(7)) and strip(got) == strip(want)
    assert json.loads((resumed / "summary.json").read_text()) == json.loads((ref / "summary.json").read_text())


@pytest.mark.parametrize("method", ["ft", "rome", "memit"])
def test_every_method_resumes_and_its_ledger_rebuilds(tmp_path, data_root, method):
    """Each editor's state_dict (context templates, ...) survives a resume, and the ledger (factors
    for ROME/MEMIT, dense for FT-C here) rebuilds an edit no checkpoint holds."""
    import shutil

    from conftest import compose

    from editlab.run import run

    args = ("model=tiny-gpt2", f"method={method}", "eval=none", "tracker=none", "tracker.plots=false",
            "sample.n_edits=4", "checkpoint.every=2", "checkpoint.keep=0", "checkpoint.dense_ledger=true")
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    run(compose(*args), ref)
    shutil.copytree(ref, resumed)
    (resumed / "checkpoints" / "LATEST").write_text("ckpt-0000002")
    run(compose(*args), resumed)
    strip = lambda rs: [{k: v for k, v in r.items() if "time" not in k} for r in rs]  # noqa: E731
    assert strip(records(resumed)) == strip(records(ref))
    a, b = final_deltas(resumed, 4), final_deltas(ref, 4)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)

    want = read_checkpoint(ref / "checkpoints" / "ckpt-0000002").deltas
    shutil.rmtree(ref / "checkpoints" / "ckpt-0000002")
    got, meta = cumulative_at(ref, 2)
    assert meta["from_checkpoint"] == 0 and got.keys() == want.keys()
    assert all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in got)
