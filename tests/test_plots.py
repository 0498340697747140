"""Local figures from metrics.jsonl: synthetic runs with every metric namespace, and a real tiny run."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from editlab.plots import main as plot_main
from editlab.plots import plot_runs
from editlab.results import breakdown, find_runs, load_run, table3, value_at

TASKS = ("sst2", "mrpc", "rte", "cola")


def write_synthetic_run(run_dir: Path, method: str, model: str = "tiny-gpt2", sample: int = 1, n: int = 200,
                        collapse: int | None = None, layers=(3,), seed: int = 0) -> Path:
    """A run dir as the stream writes it, with the paper's shapes: gradual decline, then (optionally)
    a collapse where distance jumps and efficacy/downstream fall; forgetting and downstream every 10."""
    rng = random.Random(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    windows = {5: [], 50: []}
    base = {**{f"downstream/{t}/f1_{k}": 0.7 for t in TASKS for k in ("gen", "lik")},
            **{f"downstream/{t}/invalid": 0.0 for t in TASKS}}
    recs, forgotten = [{"edit": 0, **base, "downstream/mean_f1_gen": 0.7, "downstream/mean_f1_lik": 0.7}], 0
    for e in range(1, n + 1):
        broken = collapse is not None and e >= collapse
        p_es = 0.05 if broken else 0.98 - 0.1 * e / n
        r = {"es": float(rng.random() < p_es), "ps": float(rng.random() < p_es - 0.2), "ns": float(rng.random() < 0.6)}
        r.update({f"{k}_mag": v * 0.3 - 0.1 for k, v in r.items()})
        rec = {"edit": e, "edit/failed": 0, "method/loss": 1.0 / e, "time/edit_s": 0.1, "time/eval_s": 0.05,
               **{f"method/delta_norm/model.layers.{L}.mlp.down_proj.weight": 1e3 if e == collapse else 1.0
                  for L in layers},
               **{f"edit/{k}": v for k, v in r.items()}}
        for w, d in windows.items():
            d.append(r)
            for k in r:
                rec[f"window{w}/{k}"] = sum(x[k] for x in d[-w:]) / len(d[-w:])
        dist = 1e-4 * math.sqrt(e) * (1000 if broken else 1)
        for L in layers:
            rec[f"distance/model.layers.{L}.mlp.down_proj.weight"] = dist * (1 + 0.1 * L)
            rec[f"distance/relative/model.layers.{L}.mlp.down_proj.weight"] = dist * 50
        rec["distance/mean"] = dist
        rec["distance/relative_mean"] = dist * 50
        if e % 10 == 0 or e == n:
            forgotten = min(e - 1, forgotten + rng.randint(0, 3) + (e if broken else 0))
            rec.update({"forget/frac": forgotten / e, "forget/count": forgotten, "forget/retention": 1 - forgotten / e,
                        "forget/n_earlier": e - 1, "forget/eligible": e - 1})
            f1 = 0.1 if broken else 0.7 - 0.1 * e / n
            rec.update({f"downstream/{t}/f1_gen": f1 - 0.02 * i for i, t in enumerate(TASKS)})
            rec.update({f"downstream/{t}/f1_lik": f1 + 0.05 for t in TASKS})
            rec.update({f"downstream/{t}/invalid": 0.1 for t in TASKS})
            rec["gen/fluency"] = 2.0 if broken else 5.5 - 0.5 * e / n
            for kind in ("gen", "lik"):
                rec[f"downstream/mean_f1_{kind}"] = sum(rec[f"downstream/{t}/f1_{kind}"] for t in TASKS) / len(TASKS)
        recs.append(rec)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    summary = {"n_edits": n, "n_failed": 0, "collapse/onset": collapse}
    suspects = [] if collapse is None else [{"edit": collapse, "case_ids": [7], "jump": 1.0, "median": 1e-4}]
    summary.update({"collapse/disabling": suspects, "collapse/n_disabling": len(suspects)})
    if collapse is not None:
        summary["collapse/confirmed"] = [{"edit": collapse, "case_ids": [7], "disables": True}]
    (run_dir / "summary.json").write_text(json.dumps(summary))
    cfg = {"method": {"name": method}, "model": {"name": model}, "sample": {"index": sample, "n_edits": n}}
    (run_dir / "config.json").write_text(json.dumps(cfg))
    return run_dir


@pytest.fixture
def two_runs(tmp_path):
    return [write_synthetic_run(tmp_path / "sweep" / "rome", "rome", collapse=120, layers=(5,), seed=1),
            write_synthetic_run(tmp_path / "sweep" / "memit", "memit", layers=(3, 4, 5), seed=2)]


def test_plots_from_two_runs_have_every_panel(two_runs, tmp_path):
    out = tmp_path / "plots"
    index = plot_runs(two_runs, out)
    figs = index["models"]["tiny-gpt2"]
    assert set(figs) == {"rewrite", "rewrite_magnitude", "forgetting", "downstream", "fluency", "distance",
                         "distance_relative", "delta_norm"}
    assert figs["delta_norm"]["panels"] == [f"layers.{L}.mlp.down_proj" for L in (3, 4, 5)]
    for f in figs.values():
        png = out / f["file"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert figs["rewrite"]["panels"] == [f"{s} (window {w})" for w in (5, 50)
                                         for s in ("Efficacy", "Paraphrase", "Neighborhood")]
    assert figs["downstream"]["panels"] == ["mean over tasks F1", "CoLA F1", "MRPC F1", "RTE (NLI) F1", "SST-2 F1"]
    assert figs["forgetting"]["panels"] == ["Forgotten fraction of earlier edits", "Forgotten earlier edits (count)",
                                            "Retention of all earlier edits"]
    assert figs["distance"]["panels"] == ["mean over edited matrices", "layers.3.mlp.down_proj",
                                          "layers.4.mlp.down_proj", "layers.5.mlp.down_proj"]
    assert "Single disabling edit" in (out / "report.html").read_text()
    page = (out / "report.html").read_text()
    assert all(f'src="{f["file"]}"' in page for f in figs.values())
    assert "Edits before collapse" in page and "no collapse in 200" in page
    assert json.loads((out / "index.json").read_text()) == index


def test_sampled_forgetting_rounds_are_drawn_with_their_standard_error(two_runs):
    """A round over a sample of earlier edits logs ``forget/frac_se``; the curve gets a ± 1 SE band
    exactly that wide, and a run scored over all its earlier edits gets none."""
    from matplotlib.collections import PolyCollection

    from editlab.plots import draw_figure, figure_specs, method_colors

    sampled = two_runs[1] / "metrics.jsonl"
    recs = [json.loads(line) for line in sampled.read_text().splitlines()]
    for r in recs:
        if "forget/frac" in r:
            r["forget/frac_se"] = 0.01 * (1 + r["edit"] % 3)
    sampled.write_text("".join(json.dumps(r) + "\n" for r in recs))
    runs = [load_run(d) for d in two_runs]
    title, panels = figure_specs(runs)["forgetting"]
    fig = draw_figure(title, panels, runs, method_colors(runs))
    frac_ax, count_ax = fig.axes[:2]
    bands = [c for c in frac_ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1  # memit's only; rome logged no standard error
    edits, frac = runs[1].series["forget/frac"]
    _, se = runs[1].series["forget/frac_se"]
    top = bands[0].get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx((frac + se).max())
    assert not [c for c in count_ax.collections if isinstance(c, PolyCollection)]
    assert "± 1 standard error (sampled rounds)" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_table3_from_synthetic_curves(two_runs):
    rome, memit = (table3(load_run(d)) for d in two_runs)
    assert rome["collapsed"] and rome["edits_before_collapse"] == 119
    assert rome["single_disabling_edit"] == "yes"
    assert 80 < rome["efficacy_until_collapse"] <= 100
    assert rome["downstream_loss"] == pytest.approx(100 * (0.7 - (0.7 - 0.1 * 110 / 200)) + 100 * 0.03, abs=1e-6)
    assert not memit["collapsed"] and memit["edits_before_collapse"] == 200
    assert memit["single_disabling_edit"] == "no"
    assert 0 <= memit["forgetting_pct"] <= 100


def _stop_answering(run_dir: Path, from_edit: int) -> None:
    """Every generated answer from ``from_edit`` on is no label word: F1 0, invalid 1."""
    path = run_dir / "metrics.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    for r in recs:
        if r["edit"] >= from_edit and "downstream/mean_f1_gen" in r:
            r.update({f"downstream/{t}/invalid": 1.0 for t in TASKS})
            r.update({f"downstream/{t}/f1_gen": 0.0 for t in TASKS})
            r["downstream/mean_f1_gen"] = 0.0
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_a_breakdown_without_a_distance_jump_is_a_collapse(two_runs, tmp_path):
    """MEMIT's edits can pile up smoothly into a model that answers in word salad: no step jumps,
    efficacy holds, but the answers stop being label words.  Table 3 then measures up to the last
    downstream round that still answered; the figures shade the two rounds around the breakdown."""
    from matplotlib.patches import Polygon, Rectangle

    from editlab.plots import draw_figure, figure_specs, method_colors

    memit = two_runs[1]
    before = table3(load_run(memit))
    assert not before["collapsed"] and before["breakdown_between"] is None
    _stop_answering(memit, 155)  # rounds every 10: the model still answered at 150, not at 160
    run = load_run(memit)
    assert run.collapse_edit is None and run.breakdown == (150, 160)
    row = table3(run)
    assert row["collapsed"] and row["edits_before_collapse"] == 150 and row["breakdown_between"] == [150, 160]
    assert row["forgetting_pct"] == pytest.approx(100 * value_at(run, "forget/frac", 150))
    assert row["downstream_loss"] > 0 and row["downstream_loss"] < 50  # at 150, before the answers went
    rome = table3(load_run(two_runs[0]))  # a detected onset decides where there is one
    assert rome["edits_before_collapse"] == 119 and rome["breakdown_between"] is None
    _stop_answering(two_runs[0], 115)  # ... within or after the breakdown's rounds
    assert table3(load_run(two_runs[0]))["edits_before_collapse"] == 119
    _stop_answering(two_runs[0], 95)  # an onset after the model had stopped answering comes too late
    late = table3(load_run(two_runs[0]))
    assert late["edits_before_collapse"] == 90 and late["breakdown_between"] == [90, 100]

    runs = [load_run(d) for d in two_runs]
    title, panels = figure_specs(runs)["forgetting"]
    fig = draw_figure(title, panels, runs, method_colors(runs))
    spans = [p for p in fig.axes[0].patches if isinstance(p, (Polygon, Rectangle))]
    starts = sorted(p.get_path().transformed(p.get_patch_transform()).vertices[:, 0].min() for p in spans)
    assert starts == pytest.approx([90, 150])  # rome's too: it stopped answering before its onset
    index = plot_runs(two_runs, tmp_path / "plots")
    assert "150 (broke down by 160)" in (tmp_path / "plots" / "report.html").read_text()
    assert [r["breakdown_between"] for r in index["table"]] == [[150, 160], [90, 100]]


def test_breakdown_needs_an_unedited_model_that_answers():
    assert breakdown([(0, 0.0), (100, 0.1), (200, 0.9), (300, 1.0)]) == (100, 200)
    assert breakdown([(200, 0.9), (0, 0.0)]) == (0, 200)  # rounds in any order
    assert breakdown([(0, 0.9), (100, 1.0)]) is None  # a random tiny model never answered
    assert breakdown([(100, 0.0), (200, 1.0)]) is None  # no round of the unedited model
    assert breakdown([(0, 0.0), (100, 0.5)]) is None  # exactly half: still answering
    assert breakdown([]) is None


def test_absent_namespaces_are_skipped(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    recs = [{"edit": 0}] + [{"edit": e, "edit/es": 1.0, "window5/es": 1.0, "window50/es": 1.0} for e in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"edit": 4, "edit/e')
    index = plot_runs([run], tmp_path / "out")  # the torn last line of a killed job is ignored
    figs = index["models"]["?"]
    assert list(figs) == ["rewrite"]
    assert figs["rewrite"]["panels"] == ["Efficacy (window 5)", "Efficacy (window 50)"]


def test_a_gzipped_metrics_file_reads_as_the_plain_one(two_runs, tmp_path):
    """Long runs' committed copies keep ``metrics.jsonl.gz`` (``make result``)."""
    import gzip
    import shutil

    packed = tmp_path / "packed" / "memit"
    shutil.copytree(two_runs[1], packed)
    src = packed / "metrics.jsonl"
    (packed / "metrics.jsonl.gz").write_bytes(gzip.compress(src.read_bytes()))
    src.unlink()
    assert find_runs([tmp_path / "packed"]) == [packed]
    plain, gz = load_run(two_runs[1]), load_run(packed)
    assert plain.series.keys() == gz.series.keys()
    assert all((plain.series[k][1] == gz.series[k][1]).all() for k in plain.series)
    assert table3(plain) == table3(gz)


def test_bad_input_names_the_file(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"edit": 0}\nnot json\n{"edit": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        load_run(run)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        find_runs([tmp_path / "nothing-here"])
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl in it or below"):
        find_runs([_empty_dir(tmp_path)])


def _empty_dir(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def test_cli_finds_runs_below_a_sweep_dir(two_runs, tmp_path, capsys):
    assert plot_main([f"run_dir={tmp_path / 'sweep'}", f"out={tmp_path / 'o'}"]) == 0
    assert "for 2 runs" in capsys.readouterr().out
    assert (tmp_path / "o" / "tiny-gpt2" / "forgetting.png").exists()
    assert plot_main(["rundir=x"]) == 2
    assert "unknown argument 'rundir'" in capsys.readouterr().err


def test_real_tiny_run_plots_into_its_run_dir(data_root, cache_dir, tmp_path):
    from conftest import compose

    from editlab.run import run

    cfg = compose("model=tiny-gpt2", "method=ft", "sample.n_edits=6", "eval=fast", "eval.downstream_every=0",
                  "eval.forget_every=2", "tracker=none",
                  f"run_dir={tmp_path / 'run'}", f"cache_dir={cache_dir}")
    run(cfg, tmp_path / "run")
    index = json.loads((tmp_path / "run" / "plots" / "index.json").read_text())
    assert {"rewrite", "forgetting", "distance"} <= set(index["models"]["tiny-gpt2"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["paper/edits_before_collapse"] == 6
    assert (tmp_path / "run" / "plots" / "report.html").exists()
    assert not list((tmp_path / "run").glob("wandb*"))  # tracker=none writes no W&B files


def test_a_plotting_failure_never_loses_the_run(two_runs, monkeypatch, caplog):
    import editlab.plots
    from editlab.publish import publish_results
    from editlab.tracking import JsonlTracker

    def broken(*a, **k):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(editlab.plots, "plot_runs", broken)
    publish_results(two_runs[0], JsonlTracker(two_runs[0]))  # logs, does not raise
    assert "no fonts today" in caplog.text
    summary = json.loads((two_runs[0] / "summary.json").read_text())
    assert summary["paper/edits_before_collapse"] == 119 and summary["paper/single_disabling_edit"] == "yes"
