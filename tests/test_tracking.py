"""W&B tracking, offline: the run file written under the run dir is read back record by record."""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from editlab.config import TrackerConfig
from editlab.tracking import RUN_ID_FILE, WandbTracker, build_tracker, namespaces, sweep_group, wandb_mode


def read_wandb_file(path: Path) -> list:
    """Records of a ``run-<id>.wandb`` file: wandb's LevelDB-style log (7-byte file header, 32 KiB
    blocks of ``crc32 | length | type`` chunks) of ``wandb.proto`` Records.  wandb >= 0.20 ships no
    Python reader (its writer is in Go), so the framing is decoded here."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, hdr = path.read_bytes(), 32768, 7
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path}: not a W&B run file"
    records, pos, buf = [], 7, b""
    while pos + hdr <= len(data):
        left = block - pos % block
        if left < hdr:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + hdr])
        if n == 0 and kind == 0:
            pos += left
            continue
        if pos + hdr + n > len(data):  # the writer is mid-chunk
            break
        chunk, pos = data[pos + hdr:pos + hdr + n], pos + hdr + n
        buf = chunk if kind in (1, 2) else buf + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
    return records


def read_finished(path: Path, timeout: float = 60.0) -> list:
    """The records once the file holds the run's ``exit`` record: wandb-core (a separate process)
    may still be flushing the file when ``run.finish()`` returns."""
    deadline = time.monotonic() + timeout
    while True:
        recs = read_wandb_file(path) if path.stat().st_size > 7 else []
        if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.monotonic() > deadline:
            return recs
        time.sleep(0.2)


def by_type(records, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def run_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def tracker_cfg(**kw):
    return OmegaConf.structured(TrackerConfig(name="wandb", mode="offline", **kw))


def test_offline_run_round_trip(tmp_path):
    run_dir = tmp_path / "run"
    config = {"method": {"name": "rome"}, "model": {"name": "tiny-gpt2"}, "sample": {"index": 3}}
    t = build_tracker(tracker_cfg(group="g1", tags=["extra"]), run_dir, config, "rome-tiny-gpt2-s3",
                      ["method:rome", "model:tiny-gpt2", "sample:3"], windows=[3, 7])
    t.log({"distance/mean": 0.0}, 0)
    for e in (1, 2, 3):
        t.log({"edit/es": 1.0, "window3/es": 0.5, "window7/es": 0.25, "forget/frac": 0.1,
               "downstream/sst2/f1_gen": 0.6, "distance/relative/layers.1.mlp": 1e-3, "time/edit_s": 0.1,
               "method/loss": 2.0, "edit/nan": float("nan")}, e)
    ckpt = run_dir / "checkpoints" / "ckpt-0000003"
    ckpt.mkdir(parents=True)
    (ckpt / "deltas.safetensors").write_bytes(b"\0" * 64)
    t.log_checkpoint(ckpt, 3)
    t.summary({"n_edits": 3, "collapse/onset": None, "paper/single_disabling_edit": "no"})
    t.finish()

    [path] = run_files(run_dir)
    recs = read_finished(path)
    [run] = by_type(recs, "run")
    assert run.run_id == (run_dir / RUN_ID_FILE).read_text() and path.name == f"run-{run.run_id}.wandb"
    assert run.run_group == "g1" and run.job_type == "edit-stream" and run.display_name == "rome-tiny-gpt2-s3"
    assert list(run.tags) == ["extra", "method:rome", "model:tiny-gpt2", "sample:3"]
    cfg = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert cfg["method"] == {"name": "rome"} and cfg["sample"] == {"index": 3}

    metrics = {m.glob_name or m.name: m for m in by_type(recs, "metric")}
    assert "edit" in metrics
    for ns in namespaces([3, 7]):
        assert metrics[f"{ns}/*"].step_metric == "edit"
    assert {"window3/*", "window7/*"} <= metrics.keys() and "window50/*" not in metrics  # the configured windows

    history = [{i.nested_key[0] if i.nested_key else i.key: json.loads(i.value_json) for i in h.item}
               for h in by_type(recs, "history")]
    assert [h["edit"] for h in history] == [0, 1, 2, 3]
    assert history[2]["window7/es"] == 0.25 and history[3]["downstream/sst2/f1_gen"] == 0.6
    assert all("edit/nan" not in h for h in history)  # NaN is dropped, not sent

    summary = {}
    for s in by_type(recs, "summary"):
        summary.update({(u.nested_key[0] if u.nested_key else u.key): json.loads(u.value_json) for u in s.update})
    assert summary["n_edits"] == 3 and summary["paper/single_disabling_edit"] == "no"
    assert summary["collapse/onset"] is None and summary["edit"] == 3

    [art] = by_type(recs, "artifact")
    assert art.type == "checkpoint" and json.loads(art.metadata) == {"edit": 3}
    assert set(art.aliases) >= {"latest", "edit-3"}
    refs = [e.ref for e in art.manifest.contents]
    assert refs and all(r.startswith(ckpt.resolve().as_uri()) for r in refs)  # by reference: nothing uploaded


def test_resumed_run_keeps_its_id(tmp_path):
    ids = []
    for _ in range(2):
        t = WandbTracker(tracker_cfg(), tmp_path, {}, "r", [], [5, 50])
        ids.append(t.run.id)
        t.log({"edit/es": 1.0}, len(ids))
        t.finish()
    assert ids[0] == ids[1] == (tmp_path / RUN_ID_FILE).read_text()
    # offline, each attempt is its own piece; `wandb sync` uploads them in order into one run
    assert len(run_files(tmp_path)) == 2


def test_no_wandb_files_unless_asked(tmp_path):
    for name, mode in (("none", None), ("wandb", "disabled")):
        cfg = OmegaConf.structured(TrackerConfig(name=name, mode=mode))
        t = build_tracker(cfg, tmp_path / name, {}, "r", [], [5, 50])
        t.log({"edit/es": 1.0}, 1)
        t.log_checkpoint(tmp_path, 1)
        t.finish()
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["metrics.jsonl"]
    with pytest.raises(ValueError, match="tracker.name='tensorboard'"):
        build_tracker(OmegaConf.structured(TrackerConfig(name="tensorboard")), tmp_path, {}, "r", [], [5, 50])


def test_mode_follows_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    assert wandb_mode(None) == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password x\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(None) == "disabled"
    assert wandb_mode("offline") == "offline"  # tracker.mode wins
    with pytest.raises(ValueError, match="tracker.mode='cloud'"):
        wandb_mode("cloud")


def test_online_failure_falls_back_to_offline(monkeypatch, tmp_path):
    import wandb

    real_init, modes = wandb.init, []

    def init(mode, **kw):
        modes.append(mode)
        if mode == "online":
            raise wandb.errors.CommError("no route to host")
        return real_init(mode=mode, **kw)

    monkeypatch.setattr(wandb, "init", init)
    t = WandbTracker(OmegaConf.structured(TrackerConfig(name="wandb", mode="online")), tmp_path, {}, "r", [], [5, 50])
    t.finish()
    assert modes == ["online", "offline"] and t.mode == "offline" and run_files(tmp_path)


def compose_hydra(*overrides: str):
    """A composed config with its ``hydra`` node, as a Hydra job sees it."""
    from hydra import compose, initialize_config_dir

    from editlab.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def test_group_is_the_hydra_sweep(tmp_path):
    from hydra.core.hydra_config import HydraConfig

    assert sweep_group() is None  # not under Hydra
    hc = HydraConfig.instance()
    try:
        hc.set_config(compose_hydra("hydra.mode=MULTIRUN", f"hydra.sweep.dir={tmp_path}/multirun/2026-11-22_07-00-00"))
        assert sweep_group() == "multirun/2026-11-22_07-00-00"
        hc.set_config(compose_hydra("hydra.mode=RUN"))
        assert sweep_group() is None  # a single run has no group
    finally:
        hc.cfg = None


def test_real_run_streams_to_wandb_offline(data_root, cache_dir, tmp_path):
    from conftest import compose

    from editlab.run import run

    run_dir = tmp_path / "run"
    cfg = compose("model=tiny-gpt2", "method=ft", "sample.n_edits=4", "eval=fast", "eval.downstream_every=0",
                  "tracker=wandb", "tracker.mode=offline", f"run_dir={run_dir}", f"cache_dir={cache_dir}")
    run(cfg, run_dir)
    [path] = run_files(run_dir)
    recs = read_finished(path)
    [r] = by_type(recs, "run")
    assert set(r.tags) == {"method:ft", "model:tiny-gpt2", "sample:1"}
    cfg_logged = {u.key: json.loads(u.value_json) for u in r.config.update}
    assert cfg_logged["model"]["name"] == "tiny-gpt2" and "hparams" in cfg_logged
    history = by_type(recs, "history")
    steps = [json.loads(i.value_json) for h in history for i in h.item if (i.nested_key or [i.key])[0] == "edit"]
    assert steps == [0, 1, 2, 3, 4]
    summary_keys = {(u.nested_key or [u.key])[0] for s in by_type(recs, "summary") for u in s.update}
    assert {"n_edits", "paper/efficacy_until_collapse", "paper/edits_before_collapse"} <= summary_keys
    arts = by_type(recs, "artifact")  # the checkpoints, by reference
    assert arts and all(a.type == "checkpoint" for a in arts)
    where = (run_dir / "checkpoints").resolve().as_uri()
    assert all(e.ref.startswith(where) for a in arts for e in a.manifest.contents)


def test_multirun_jobs_share_the_sweep_group(data_root, cache_dir, tmp_path):
    import os
    import subprocess
    import sys

    sweep = tmp_path / "multirun" / "s1"
    subprocess.run([sys.executable, "-m", "editlab", "-m", "model=tiny-gpt2", "method=ft", "sample=1,2",
                    "sample.n_edits=1", "eval=none", "tracker=wandb", "tracker.mode=offline",
                    f"cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}"],
                   check=True, capture_output=True, env={**os.environ, "EDITLAB_DATA": str(data_root)})
    runs = [by_type(read_finished(p), "run")[0] for p in sorted(sweep.glob("*/wandb/offline-run-*/run-*.wandb"))]
    assert [r.run_group for r in runs] == ["multirun/s1", "multirun/s1"]
    assert [sorted(r.tags)[-1] for r in runs] == ["sample:1", "sample:2"]
