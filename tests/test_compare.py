"""``editlab compare``: one row per run, every number read at the same edit."""
from __future__ import annotations

import json

import pytest
from test_plots import write_synthetic_run

from editlab.compare import compare_row, markdown
from editlab.compare import main as compare_main
from editlab.results import load_run


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_row_reads_every_column_at_the_requested_edit(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "memit", "memit", n=60, seed=3)
    recs = {r["edit"]: r for r in _records(run_dir)}
    row = compare_row(load_run(run_dir), at_edit=45, window=50)
    assert row["es"] == recs[45]["window50/es"] and row["ns"] == recs[45]["window50/ns"]
    # forgetting and downstream are measured every 10: the newest round at or before 45 is 40's
    assert row["forgetting_pct"] == pytest.approx(recs[40]["forget/frac"] * 100)
    tasks = ("sst2", "mrpc", "rte", "cola")
    change = sum(recs[40][f"downstream/{t}/f1_gen"] - recs[0][f"downstream/{t}/f1_gen"] for t in tasks) / 4
    assert row["downstream_change"] == pytest.approx(change * 100)
    assert row["distance"] == recs[45]["distance/relative_mean"]
    assert row["time_per_edit"] == pytest.approx(0.1) and row["failed"] == 0


def test_unmeasured_values_stay_empty_and_grace_reports_its_codebook(tmp_path):
    run_dir = tmp_path / "grace"
    run_dir.mkdir()
    recs = [{"edit": 0}] + [{"edit": e, "edit/es": 1.0, "window50/es": 1.0, "method/codebook_size": float(e),
                             "time/edit_s": 2.0, "edit/failed": int(e == 2)} for e in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run_dir / "config.json").write_text(json.dumps({"method": {"name": "grace"}}))
    row = compare_row(load_run(run_dir), at_edit=3)
    assert row["forgetting_pct"] is None and row["downstream_change"] is None and row["ps"] is None
    assert row["distance"] is None and row["adaptor"] == "codebook 3" and row["failed"] == 1


def test_wise_reports_its_side_memory_distance_in_the_distance_column(tmp_path):
    run_dir = tmp_path / "wise"
    run_dir.mkdir()
    recs = [{"edit": 0}] + [{"edit": e, "edit/es": 1.0, "method/side_distance": 0.01 * e, "time/edit_s": 1.0}
                            for e in (1, 2)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run_dir / "config.json").write_text(json.dumps({"method": {"name": "wise"}}))
    table = markdown([compare_row(load_run(run_dir), at_edit=2)], window=50)
    assert "| wise · " in table and "| side 0.0200 |" in table


def test_cli_table_over_a_sweep_defaults_to_the_shortest_run(tmp_path, capsys):
    write_synthetic_run(tmp_path / "sweep" / "rome", "rome", n=30, seed=1)
    write_synthetic_run(tmp_path / "sweep" / "memit", "memit", n=50, seed=2)
    out = tmp_path / "table.md"
    assert compare_main([f"run_dir={tmp_path / 'sweep'}", f"out={out}"]) == 0
    text = out.read_text()
    assert text.startswith("At edit 30;") and text == capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| rome") or line.startswith("| memit")]
    assert len(rows) == 2 and all(line.count("|") == 10 for line in rows)


def test_cli_names_a_missing_run_dir(tmp_path, capsys):
    assert compare_main([f"run_dir={tmp_path / 'nope'}"]) == 2
    assert "nope" in capsys.readouterr().err


def test_parsing_the_arguments_does_not_import_matplotlib():
    """matplotlib is for drawing: ``editlab compare`` (and ``report``) never draw."""
    import subprocess
    import sys

    code = "import sys, editlab.compare, editlab.report; print('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
