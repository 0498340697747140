"""The W&B report's specification, built and serialised offline (no server, no account)."""
from __future__ import annotations

import json

import pytest

from editlab.report import build_report, report_spec, run_filter
from editlab.report import main as report_main
from editlab.results import TABLE3_COLUMNS, rewrite_panels

# wandb-workspaces still uses pydantic-v1-style validators
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def grids(spec):
    return [b for b in spec["blocks"] if b["type"] == "panel-grid"]


def panels_of(grid):
    return grid["metadata"]["panelBankSectionConfig"]["panels"]


def headings(spec, level):
    return [b["children"][0]["text"] for b in spec["blocks"] if b["type"] == "heading" and b["level"] == level]


@pytest.fixture(scope="module")
def spec():
    report = build_report("lab", "editlab", ["gpt2-xl", "smollm2-135m"], methods=["rome", "memit"],
                          group="multirun/2026-11-22_07-00-00")
    return report_spec(report)


def test_one_section_per_model_after_table3(spec):
    assert headings(spec, 1) == ["Table 3: collapse, forgetting and downstream loss per method",
                                 "gpt2-xl", "smollm2-135m"]
    assert len(grids(spec)) == 1 + 2 * 4  # Table 3, then 4 figures per model


def test_every_panel_is_against_edit_grouped_by_method(spec):
    for grid in grids(spec)[1:]:
        [runset] = grid["metadata"]["runSets"]
        assert runset["grouping"] == [{"section": "config", "name": "method.value.name"}]
        for p in panels_of(grid):
            assert p["viewType"] == "Run History Line Plot"
            assert p["config"]["xAxis"] == "edit"
            assert p["config"]["groupAgg"] == "mean"


def test_the_papers_panels(spec):
    model_grids = grids(spec)[1:5]  # gpt2-xl's figures
    titles = [[p["config"]["chartTitle"] for p in panels_of(g)] for g in model_grids]
    assert titles[0] == [t for t, _ in rewrite_panels((5, 50))]
    assert panels_of(model_grids[0])[0]["config"]["metrics"] == ["window5/es"]
    assert panels_of(model_grids[0])[5]["config"]["metrics"] == ["window50/ns"]
    assert "Forgotten fraction of earlier edits" in titles[1]
    assert panels_of(model_grids[1])[0]["config"]["metrics"] == ["forget/frac"]
    assert titles[2] == ["mean over tasks F1", "SST-2 F1", "MRPC F1", "RTE (NLI) F1", "CoLA F1"]
    assert panels_of(model_grids[2])[1]["config"]["metrics"] == ["downstream/sst2/f1_gen", "downstream/sst2/f1_lik"]
    dist = {p["config"]["chartTitle"]: p["config"] for p in panels_of(model_grids[3])}
    assert dist["Relative distance per edited matrix"]["metricRegex"] == "^distance/relative/.*"
    assert dist["Distance per edited matrix"]["useMetricRegex"]
    layouts = [p["layout"] for p in panels_of(model_grids[0])]
    assert [(l["x"], l["y"]) for l in layouts] == [(0, 0), (8, 0), (16, 0), (0, 6), (8, 6), (16, 6)]


def test_filters_and_table3_columns(spec):
    table, first = grids(spec)[0], grids(spec)[1]
    [rs] = table["metadata"]["runSets"]
    assert rs["runFeed"]["columnPinned"] == {f"summary:paper/{k}": True for k, _ in TABLE3_COLUMNS} | {
        "summary:n_edits": True}
    assert [g["name"] for g in rs["grouping"]] == ["model.value.name", "method.value.name"]
    filters = {(f["key"]["name"], f["op"]): f["value"] for f in first["metadata"]["runSets"][0]["filters"]["filters"]}
    assert filters == {("model.name", "="): "gpt2-xl", ("method.name", "IN"): ["rome", "memit"],
                       ("group", "="): "multirun/2026-11-22_07-00-00"}


def test_filter_expression():
    assert run_filter("m", samples=["1", "2"], tags=["x"], extra="Config('seed') = 0 or State = 'finished'") == (
        "Config('model.name') = 'm' and Config('sample.index') in [1, 2] and Tags in ['x'] and "
        "(Config('seed') = 0 or State = 'finished')")


def test_cli_dry_run_writes_the_spec(tmp_path, capsys):
    out = tmp_path / "spec.json"
    assert report_main(["entity=lab", "models=[tiny-gpt2]", "tasks=[sst2]", "windows=[50]",
                        "dry_run=true", f"out={out}"]) == 0
    spec = json.loads(out.read_text())
    titles = [p["config"]["chartTitle"] for g in grids(spec)[1:] for p in panels_of(g)]
    assert "Efficacy (window 50)" in titles and "Efficacy (window 5)" not in titles
    assert "SST-2 F1" in titles and "MRPC F1" not in titles
    assert "not saved" in capsys.readouterr().out
    assert report_main(["entity=lab", "dry_run=true"]) == 2
    assert "needs models" in capsys.readouterr().err


def test_cli_saves_with_models_from_the_project(monkeypatch, capsys):
    """Without models=, the models come from the project's runs; then the report is saved (both mocked:
    the server is the one thing this test cannot reach)."""
    import wandb
    import wandb_workspaces.reports.v2 as wr

    class Run:
        def __init__(self, model):
            self.config = {"model": {"name": model}} if model else {}

    queries, saved = [], []

    class Api:
        def runs(self, path, filters):
            queries.append((path, filters))
            return [Run("gpt2-xl"), Run("smollm2-135m"), Run("gpt2-xl"), Run(None)]

    def save(self, draft=False, clone=False):
        saved.append(report_spec(self))
        self.id = "abc"
        return self

    monkeypatch.setattr(wandb, "Api", Api)
    monkeypatch.setattr(wr.Report, "save", save)
    monkeypatch.setattr(wr.Report, "url", property(lambda self: f"https://wandb.ai/lab/editlab/reports/{self.id}"))
    assert report_main(["entity=lab", "group=sweep1"]) == 0
    assert queries == [("lab/editlab", {"group": "sweep1"})]
    assert headings(saved[0], 1)[1:] == ["gpt2-xl", "smollm2-135m"]
    assert "reports/abc" in capsys.readouterr().out
