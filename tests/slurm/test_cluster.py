"""Sweeps on a real one-node SLURM cluster (``make slurm-test``): a 2 x 2 multirun through the
slurm launcher, and a job interrupted mid-stream (requeue, time limit) that resumes and loses no edit."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from test_tracking import by_type, read_finished  # W&B offline-file reader (tests/test_tracking.py)

from editlab.checkpoint import committed_checkpoints, read_checkpoint

from .conftest import ROOT

pytestmark = pytest.mark.slurm
JOB_TIMEOUT = 1200  # seconds; generous, the test machine may be shared


@contextmanager
def editlab(args: list[str], env: dict):
    """``python -m editlab`` from the checkout, with the project's interpreter (jobs reuse it).

    Killed on the way out if a failed assertion left it running (the cluster fixture then
    cancels its jobs)."""
    proc = subprocess.Popen([sys.executable, "-m", "editlab", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def finish(proc: subprocess.Popen, what: str) -> str:
    try:
        out, _ = proc.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"{what} did not finish in {JOB_TIMEOUT}s:\n{out[-3000:]}")
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{out[-3000:]}"
    return out


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def squeue(env: dict) -> list[tuple[str, str]]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=env, capture_output=True, text=True, check=True)
    return [tuple(line.split()) for line in out.stdout.splitlines()]


def test_2x2_multirun(slurm_env, tmp_path):
    sweep = tmp_path / "sweep"
    t0 = time.perf_counter()
    with editlab(["experiment=smoke_grid", "hydra/launcher=slurm_localtest", f"hydra.sweep.dir={sweep}",
                  "tracker=wandb", "tracker.mode=offline"], slurm_env) as proc:
        finish(proc, "the 2x2 multirun")
    print(f"2x2 multirun on SLURM: {time.perf_counter() - t0:.0f}s wall")
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert runs == [f"ft-tiny-gpt2-sample{s}-seed{seed}" for s in (1, 2) for seed in (0, 1)]
    for name in runs:
        run_dir = sweep / name
        assert [r["edit"] for r in records(run_dir)] == list(range(7)), name  # baseline + 6 edits
        assert json.loads((run_dir / "summary.json").read_text())["n_edits"] == 6
        cfg = json.loads((run_dir / "config.json").read_text())
        assert (cfg["seed"], cfg["sample"]["index"]) == (int(name[-1]), int(name[-7]))
        assert committed_checkpoints(run_dir / "checkpoints")
    # One W&B group for the sweep: the sweep dir's last two parts.
    wandb_files = sorted(sweep.glob("*/wandb/offline-run-*/run-*.wandb"))
    groups = [by_type(read_finished(f), "run")[0].run_group for f in wandb_files]
    assert groups == [f"{tmp_path.name}/sweep"] * 4
    # They ran as a SLURM job array, its submitit files inside the sweep dir.
    tasks = [p.name for p in (sweep / ".submitit").iterdir() if p.is_dir() and "_" in p.name]
    assert len(tasks) == 4 and len({t.split("_")[0] for t in tasks}) == 1


N_EDITS = 200
STREAM = ["model=tiny-gpt2", "method=ft", "sample=1", f"sample.n_edits={N_EDITS}", "eval=none",
          "tracker=none", "checkpoint.every=5", "checkpoint.keep=0"]


def ledger_ranges(run_dir: Path) -> list[tuple[int, int]]:
    """(first, last) edit of each ledger shard, steps-<first>-<last>.safetensors."""
    return sorted(tuple(int(x) for x in p.stem.split("-")[1:]) for p in (run_dir / "ledger").glob("steps-*"))


# How a running job is interrupted.  scontrol requeue: what an admin or a preemption does (SIGTERM,
# which submitit ignores, SIGKILL KillWait=5s later, then SLURM restarts the batch script).  USR2:
# the signal SLURM sends signal_delay_s before the time limit; submitit takes it for a timeout
# (this profile's timeout_min is 10, so any run time counts), pickles the call and requeues the job.
INTERRUPT = {"requeue": ["scontrol", "requeue"], "timeout": ["scancel", "--signal=USR2"]}


def restart_when_pending(job: str, run_dir: Path, proc: subprocess.Popen, env: dict) -> int:
    """Wait for the interrupted job to be pending again and start it at once (SLURM holds a requeued
    job for ~2 minutes, BeginTime); the edit the stream had reached when it stopped."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if dict(squeue(env)).get(job) == "PENDING":
            stopped_at = records(run_dir)[-1]["edit"]
            subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=env, check=True)
            return stopped_at
        time.sleep(0.3)
    pytest.fail(f"job {job} was not requeued")


@pytest.mark.parametrize("how", sorted(INTERRUPT))
def test_interrupted_job_resumes_and_loses_nothing(slurm_env, tmp_path, how):
    sweep = tmp_path / "sweep"
    run_dir = sweep / "ft-tiny-gpt2-sample1-seed0"
    with editlab(["-m", *STREAM, "hydra/launcher=slurm_localtest", f"hydra.sweep.dir={sweep}"],
                 slurm_env) as proc:
        # Mid-stream: a checkpoint exists and edits remain.  Then interrupt it.
        deadline = time.monotonic() + JOB_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail("the job ended before it could be requeued:\n" + proc.stdout.read()[-3000:])
            assert time.monotonic() < deadline, "the job never reached its second checkpoint"
            ckpts = committed_checkpoints(run_dir / "checkpoints") if (run_dir / "checkpoints").exists() else []
            if ckpts and ckpts[-1][0] >= 10:
                done = records(run_dir)[-1]["edit"]
                if done < N_EDITS // 2:
                    break
                pytest.fail(f"the stream ran too fast to interrupt (at edit {done} of {N_EDITS})")
            time.sleep(0.2)
        (job, state), = squeue(slurm_env)
        assert state == "RUNNING"
        subprocess.run([*INTERRUPT[how], job], env=slurm_env, check=True)
        stopped_at = restart_when_pending(job, run_dir, proc, slurm_env)
        finish(proc, "the requeued job")
    if how == "timeout":
        logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.*"))
        assert "this job is timed-out" in logs and "Exiting gracefully after preemption/timeout" in logs

    log = (run_dir / "cli.log").read_text()
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    assert len(resumed) == 1, f"expected one resume in {run_dir / 'cli.log'}:\n{log[-3000:]}"
    resumed_at = int(resumed[0].rsplit("at edit", 1)[1])
    assert 10 <= resumed_at <= stopped_at < N_EDITS, (resumed_at, stopped_at)
    print(f"{how}: stopped at edit {stopped_at} of {N_EDITS}; resumed from the checkpoint at edit {resumed_at}")

    # Exactly the edits of an uninterrupted run: each once, same scores, same final weights.
    ref_dir = tmp_path / "uninterrupted"
    env = {**slurm_env, "OMP_NUM_THREADS": "1"}  # as in the job (slurm_localtest's setup lines)
    with editlab([*STREAM, f"hydra.run.dir={ref_dir}"], env) as proc:
        finish(proc, "the uninterrupted run")
    got, want = records(run_dir), records(ref_dir)
    assert [r["edit"] for r in got] == [r["edit"] for r in want] == list(range(N_EDITS + 1))
    for g, w in zip(got, want):
        for key, value in w.items():
            if not key.startswith("time/"):
                assert g[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (g["edit"], key)
    shards = ledger_ranges(run_dir)
    assert [a for a, _ in shards] == [1] + [b + 1 for _, b in shards[:-1]] and shards[-1][1] == N_EDITS
    final = read_checkpoint(committed_checkpoints(run_dir / "checkpoints")[-1][1])
    ref = read_checkpoint(committed_checkpoints(ref_dir / "checkpoints")[-1][1])
    assert final.edit == ref.edit == N_EDITS
    assert final.deltas.keys() == ref.deltas.keys()
    for name, delta in ref.deltas.items():
        torch.testing.assert_close(final.deltas[name], delta, rtol=1e-5, atol=1e-7)
