"""``editlab probe``: a run's model rebuilt at any edit and measured as the run measures it."""
import json

import pytest
from conftest import compose

from editlab.probe import main, probe
from editlab.run import run

# Downstream every 3 and checkpoints every 3; FT-C's steps are kept in the ledger, so edits
# between checkpoints can be rebuilt too.
ARGS = ("model=tiny-llama", "method=ft", "method.steps=3", "eval=fast", "eval.forget_every=0",
        "eval.downstream_every=3", "eval.downstream_n=8", "eval.downstream_generate=true",
        "tracker=none", "tracker.plots=false",
        "checkpoint.every=3", "checkpoint.keep=0", "checkpoint.dense_ledger=true", "seed=0", "sample.n_edits=6")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_root):
    d = tmp_path_factory.mktemp("probe") / "run"
    run(compose(*ARGS), d)
    return d


def rounds(run_dir):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "downstream/mean_f1_lik" in rec:
            out[rec["edit"]] = {k: v for k, v in rec.items() if k.startswith("downstream/")}
    return out


def test_probe_at_the_runs_rounds_gives_the_runs_numbers(run_dir):
    taken = rounds(run_dir)
    assert sorted(taken) == [0, 3, 6] and "downstream/sst2/invalid" in taken[3]
    # the edits move the tiny model's scores, so a probe that rebuilt nothing would fail below
    assert taken[6]["downstream/mean_f1_lik"] != taken[0]["downstream/mean_f1_lik"]
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    records = probe(run_dir, [6, 0, 3, 5], prompts=["The capital of France is"], tokens=4)
    assert [r["edit"] for r in records] == [6, 0, 3, 5]
    for rec in records[:3]:  # the model is reset between edits, whatever the order
        got = {k: v for k, v in rec.items() if k in taken[rec["edit"]]}
        assert got == pytest.approx(taken[rec["edit"]], abs=1e-9)
    # edit 5 lies between checkpoints: rebuilt from the ledger, and a different model
    assert records[3]["downstream/mean_f1_lik"] is not None
    assert {r["edit"]: r["downstream/mean_invalid"] for r in records}[0] == pytest.approx(
        sum(v for k, v in taken[0].items() if k.endswith("/invalid")) / 4)
    assert all(isinstance(r["continuations"]["The capital of France is"], str) for r in records)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # only read


def test_probe_cli_and_its_errors(run_dir, tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert main([f"run_dir={run_dir}", "at=[3]", "tasks=[sst2]", "n=4", f"out={out}"]) == 0
    printed = capsys.readouterr().out
    assert "| 3 |" in printed and "answers that are no label word" in printed
    rec = json.loads(out.read_text())["records"][0]
    assert rec["edit"] == 3 and "downstream/sst2/f1_lik" in rec and "downstream/rte/f1_lik" not in rec
    assert main([f"run_dir={run_dir}", "at=[9]"]) == 2
    assert "at_edit=9" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
    assert main([f"run_dir={run_dir}"]) == 2
    assert "missing at=" in capsys.readouterr().err
    assert main([f"run_dir={run_dir}", "at=[x]"]) == 2
    assert "integers" in capsys.readouterr().err
