"""``editlab report entity=... project=... [filters]``: the paper's figures as a W&B report.

One section per model; in each, the panels of the local plots (same titles) against ``edit``,
runs grouped by method: efficacy/paraphrase/neighborhood (windows 5 and 50), forgetting,
downstream F1 per task, distance per edited matrix.  First, Table 3 as the runs table with the
``paper/*`` summary columns every run writes at its end (see :func:`editlab.results.table3`).

The report is a specification built locally (wandb-workspaces); only ``save`` talks to the
server, so ``dry_run=true`` writes the specification to a JSON file with no account at all.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

from editlab.args import UsageError, parse_args
from editlab.results import FORGET_PANELS, TABLE3_COLUMNS, rewrite_panels, task_title

DEFAULT_TASKS = ("sst2", "mrpc", "rte", "cola")
COLUMNS, GRID_W, PANEL_H = 3, 24, 6  # W&B panel grids are 24 units wide


def run_filter(model: str | None = None, methods: Sequence[str] = (), samples: Sequence[str] = (),
               group: str | None = None, tags: Sequence[str] = (), extra: str = "") -> str:
    """A wandb-workspaces filter expression selecting the runs of one report section."""
    def quoted(vals):
        return "[" + ", ".join(repr(str(v)) for v in vals) + "]"

    parts = []
    if model:
        parts.append(f"Config('model.name') = {model!r}")
    if methods:
        parts.append(f"Config('method.name') in {quoted(methods)}")
    if samples:
        parts.append(f"Config('sample.index') in [{', '.join(str(int(s)) for s in samples)}]")
    if group:
        parts.append(f"Group = {group!r}")
    if tags:
        parts.append(f"Tags in {quoted(tags)}")
    if extra:
        parts.append(f"({extra})" if " or " in extra.lower() else extra)
    return " and ".join(parts)


def _grid(wr, filters: str, panels: list, runset_name: str, **runset_kw) -> Any:
    for i, p in enumerate(panels):
        w = GRID_W // COLUMNS
        p.layout = wr.Layout(x=(i % COLUMNS) * w, y=(i // COLUMNS) * PANEL_H, w=w, h=PANEL_H)
    runset = wr.Runset(name=runset_name, filters=filters, groupby=["config.method.name"], **runset_kw)
    return wr.PanelGrid(runsets=[runset], panels=panels)


def _line(wr, title: str, y: list[str] | None = None, regex: str | None = None, ylabel: str = "") -> Any:
    kw: dict[str, Any] = {"metric_regex": regex} if regex else {"y": y}
    return wr.LinePlot(title=title, x="edit", title_x="number of edits", title_y=ylabel,
                       groupby_aggfunc="mean", groupby_rangefunc="minmax", **kw)


def model_sections(wr, model: str, filters: str, tasks: Sequence[str], windows: Sequence[int]) -> list:
    """The blocks of one model's section: a heading and one panel grid per figure."""
    name = f"{model} runs"
    rewrite = [_line(wr, t, [k], ylabel="score") for t, k in rewrite_panels(windows)]
    forget = [_line(wr, t, [k], ylabel=yl) for k, t, yl in FORGET_PANELS]
    downstream = [_line(wr, "mean over tasks F1", ["downstream/mean_f1_gen", "downstream/mean_f1_lik"], ylabel="F1")]
    downstream += [_line(wr, f"{task_title(t)} F1", [f"downstream/{t}/f1_gen", f"downstream/{t}/f1_lik"], ylabel="F1")
                   for t in tasks]
    distance = [
        _line(wr, "mean over edited matrices", ["distance/mean"], ylabel="‖W − W₀‖_F / numel(W)"),
        _line(wr, "Distance per edited matrix", regex=r"^distance/(?!relative|mean).*", ylabel="‖W − W₀‖_F / numel(W)"),
        _line(wr, "Relative distance per edited matrix", regex=r"^distance/relative/.*", ylabel="‖W − W₀‖_F / ‖W₀‖_F"),
    ]
    return [
        wr.H1(model),
        wr.H2("Efficacy, paraphrase, neighborhood vs edits (windows " + " and ".join(map(str, windows)) + ")"),
        _grid(wr, filters, rewrite, name),
        wr.H2("Forgetting of earlier edits vs edits"),
        _grid(wr, filters, forget, name),
        wr.H2("Downstream F1 per task vs edits (solid: generation F1, the paper's; also label-likelihood F1)"),
        _grid(wr, filters, downstream, name),
        wr.H2("Distance from the unedited weights per layer vs edits"),
        _grid(wr, filters, distance, name),
    ]


def build_report(entity: str, project: str, models: Sequence[str], methods: Sequence[str] = (),
                 samples: Sequence[str] = (), group: str | None = None, tags: Sequence[str] = (),
                 extra_filter: str = "", tasks: Sequence[str] = DEFAULT_TASKS, windows: Sequence[int] = (5, 50),
                 title: str = "Model editing at scale: gradual and catastrophic forgetting") -> Any:
    """The report object (nothing is sent): Table 3, then one section per model."""
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError as e:
        raise SystemExit("editlab report needs wandb-workspaces: pip install 'editlab[report]'") from e
    if not models:
        raise ValueError("no models to report on: pass models=[...] (or runs must exist in the project)")
    common = dict(methods=methods, samples=samples, group=group, tags=tags, extra=extra_filter)
    table_cols = ["summary:n_edits", *[f"summary:paper/{k}" for k, _ in TABLE3_COLUMNS]]
    legend = "; ".join(f"paper/{k} = {h}" for k, h in TABLE3_COLUMNS)
    blocks: list = [
        wr.TableOfContents(),
        wr.H1("Table 3: collapse, forgetting and downstream loss per method"),
        wr.P("Runs grouped by model and method; columns measured up to the detected collapse (or the end "
             f"of the run): {legend}."),
        wr.PanelGrid(runsets=[wr.Runset(name="all runs", filters=run_filter(**common),
                                        groupby=["config.model.name", "config.method.name"],
                                        pinned_columns=table_cols)],
                     panels=[]),
    ]
    for model in models:
        blocks += model_sections(wr, model, run_filter(model, **common), tasks, windows)
    scope = run_filter(**common) or "all runs"
    return wr.Report(entity=entity, project=project, title=title, blocks=blocks, width="fluid",
                     description=f"editlab runs of {entity}/{project} ({scope}), x axis: number of edits.")


def report_spec(report) -> dict[str, Any]:
    """The JSON the server would receive (what ``Report.save`` uploads)."""
    return json.loads(report._to_model().spec.model_dump_json(by_alias=True, exclude_none=True))


def models_in_project(entity: str, project: str, filters: dict[str, Any]) -> list[str]:
    import wandb

    runs = wandb.Api().runs(f"{entity}/{project}", filters=filters)
    return sorted({r.config.get("model", {}).get("name") for r in runs} - {None})


USAGE = ("editlab report entity=ENTITY [project=editlab] [models=[..]] [methods=[..]] [samples=[..]] [group=G] "
         "[tags=[..]] [filter=EXPR] [tasks=[..]] [windows=[..]] [title=T] [dry_run=true out=FILE]")


def options(argv: list[str]) -> dict[str, Any]:
    """The command line's options; a :class:`UsageError` for one the command cannot run."""
    a = parse_args(argv, {"entity": None, "project": "editlab", "models": [], "methods": [], "samples": [],
                          "group": None, "tags": [], "filter": "", "tasks": list(DEFAULT_TASKS), "windows": [],
                          "title": None, "dry_run": False, "out": None}, required=("entity",), usage=USAGE)
    if a["dry_run"] and not a["models"]:
        raise UsageError("dry_run=true needs models=[...] (listing runs needs the server)")
    try:
        a["windows"] = [int(w) for w in a["windows"]] or [5, 50]
    except ValueError:
        raise UsageError(f"windows={a['windows']}: expected integers") from None
    return a


def main(argv: list[str]) -> int:
    try:
        a = options(argv)
    except UsageError as e:
        print(f"editlab report: {e}", file=sys.stderr)
        return 2
    models = a["models"] or models_in_project(a["entity"], a["project"], {"group": a["group"]} if a["group"] else {})
    kw = {"title": a["title"]} if a["title"] else {}
    report = build_report(a["entity"], a["project"], models, a["methods"], a["samples"], a["group"], a["tags"],
                          a["filter"], a["tasks"], a["windows"], **kw)
    if a["dry_run"]:
        out = Path(a["out"] or "report_spec.json")
        out.write_text(json.dumps(report_spec(report), indent=2))
        print(f"editlab report: specification for {len(models)} models written to {out} (not saved)")
        return 0
    report.save()
    print(f"editlab report: {report.url}")
    return 0
