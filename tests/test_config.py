"""Config composition: every option of every group, schema checks, per-model method defaults."""
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, compose
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from editlab.cli import CONF_DIR, normalize_overrides
from editlab.config import resolve_hparams, with_inherited
from editlab.methods import METHODS

CONF = Path(CONF_DIR)
GROUPS = ("model", "method", "sample", "eval", "tracker", "data")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"conf/{group} has no options"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    cfg = compose(f"{group}={option}")
    node = cfg[group]
    if group == "sample":
        assert node.index == int(option)
    elif group in ("model", "method", "eval", "tracker"):
        assert node.name == option
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_defaults():
    cfg = compose()
    assert (cfg.model.name, cfg.method.name, cfg.sample.index, cfg.eval.name) == ("smollm2-135m", "ft", 1, "paper")
    assert cfg.sample.n_edits == 1000 and cfg.sample.batch_size == 1


def test_memit_gpt2xl_sample3_composes_before_memit_exists():
    cfg = compose("method=memit", "model=gpt2-xl", "sample=3")
    assert (cfg.method.name, cfg.model.hub_id, cfg.sample.index) == ("memit", "gpt2-xl", 3)
    hp = resolve_hparams(cfg.method, cfg.model.name, METHODS["memit"].Hparams)
    assert hp.layers == [13, 14, 15, 16, 17] and hp.mom2_update_weight == 20000


def test_cli_cfg_job_prints_the_composed_config(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "editlab", "--cfg", "job", "method=memit", "model=gpt2-xl", "sample=3"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert (cfg.method.name, cfg.model.name, cfg.sample.index) == ("memit", "gpt2-xl", 3)


@pytest.mark.parametrize("override", [
    "model.dtyp=float32",  # misspelt key in a group
    "sample.n_edit=5",
    "eval.forget_evry=3",
    "tracker.projct=x",
    "data.rot=/x",
    "method.lr_rate=0.1",  # not an FT hyperparameter
    "seeed=1",  # top level
])
def test_misspelt_key_on_command_line_raises(override):
    with pytest.raises(ConfigCompositionException):
        compose(override)


def test_wrong_type_raises():
    with pytest.raises(ConfigCompositionException):
        compose("sample.n_edits=many")


def test_misspelt_key_in_a_yaml_file_raises(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "model" / "typo.yaml").write_text("defaults: [model_schema]\nname: typo\nhub_idd: gpt2\n")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        with pytest.raises((ConfigCompositionException, ConfigKeyError)):
            hydra_compose(config_name="config", overrides=["model=typo"])


def test_unknown_option_raises():
    with pytest.raises(ConfigCompositionException):
        compose("model=gpt5")


def test_numeric_sample_choices_are_quoted_for_hydra():
    assert normalize_overrides(["sample=3", "sample=1,2,10", "model=gpt2", "sample.n_edits=5"]) == [
        "sample='3'", "sample='1','2','10'", "model=gpt2", "sample.n_edits=5"]
    assert compose("sample=10").sample.index == 10


# -- per-model method defaults -----------------------------------------------------------------

def table(method_cfg):
    """A method's per_model rows as it reads them: inherited rows under its own."""
    return with_inherited(method_cfg, {f.name for f in dataclasses.fields(METHODS[method_cfg.name].Hparams)}).per_model


def method_rows():
    rows = []
    for method in options("method"):
        cfg = compose(f"method={method}", "tracker=none")
        for model in options("model"):
            rows.append((method, model, model in table(cfg.method)))
    return rows


@pytest.mark.parametrize("method,model,has_row", method_rows())
def test_every_method_model_row_resolves_and_validates(method, model, has_row):
    cfg = compose(f"method={method}", f"model={model}", "tracker=none")
    assert method in METHODS, f"conf/method/{method}.yaml has no editor class in editlab.methods.METHODS"
    hp = resolve_hparams(cfg.method, cfg.model.name, METHODS[method].Hparams)  # validate() runs inside
    if has_row:
        for key, value in table(cfg.method)[model].items():
            assert OmegaConf.to_container(OmegaConf.create({"v": value}))["v"] == getattr(hp, key), key


def test_every_per_model_row_names_a_model_option():
    for method in options("method"):
        table = compose(f"method={method}", "tracker=none").method.per_model
        unknown = set(table) - set(options("model")) - {"default"}
        assert not unknown, f"conf/method/{method}.yaml has rows for models with no conf/model option: {unknown}"


def test_ft_rows_follow_the_paper():
    for model, layer, eps in (("gpt2-xl", 17, 5e-4), ("gpt-j-6b", 5, 5e-5)):
        cfg = compose("method=ft", f"model={model}")
        hp = resolve_hparams(cfg.method, model, METHODS["ft"].Hparams)
        assert (hp.layers, hp.norm_constraint, hp.lr, hp.steps, hp.early_stop_loss) == ([layer], eps, 5e-4, 25, 1e-2)


def test_top_level_key_overrides_the_per_model_row():
    cfg = compose("method=ft", "model=gpt2-xl", "method.layers=[3]", "method.lr=0.1", "method.anchor=run")
    hp = resolve_hparams(cfg.method, "gpt2-xl", METHODS["ft"].Hparams)
    assert hp.layers == [3] and hp.lr == 0.1 and hp.anchor == "run"
    assert hp.norm_constraint == 5e-4  # untouched keys still come from the row


def test_model_without_a_row_gets_the_default_row_or_the_reference_depth():
    method = OmegaConf.create({"name": "ft", "per_model": {"default": {"layers": [2]}}, "lr": None})
    assert resolve_hparams(method, "some-new-model", METHODS["ft"].Hparams).layers == [2]
    cfg = compose("method=ft")  # gpt2-xl's layer 17 of 48, never as an absolute number
    assert resolve_hparams(cfg.method, "some-new-model", METHODS["ft"].Hparams, n_layers=30).layers == [10]
    with pytest.raises(ValueError, match="no per_model row for model 'some-new-model'.*layer count"):
        resolve_hparams(cfg.method, "some-new-model", METHODS["ft"].Hparams)
    method = OmegaConf.create({"name": "ft", "per_model": {}})
    with pytest.raises(ValueError, match="names no reference_model"):
        resolve_hparams(method, "some-new-model", METHODS["ft"].Hparams, n_layers=30)


# -- inherit: rows that start from another method's ---------------------------------------------

def fields(hparams) -> set[str]:
    return {f.name for f in dataclasses.fields(hparams)}


@pytest.mark.parametrize("method", ["emmet", "alphaedit", "encore"])
def test_memits_descendants_take_its_rows(method):
    cfg, memit = compose(f"method={method}").method, compose("method=memit").method
    assert cfg.inherit == "memit"
    for model in [*memit.per_model, "some-new-model"]:
        hp = resolve_hparams(cfg, model, METHODS[method].Hparams, n_layers=30)
        ref = resolve_hparams(memit, model, METHODS["memit"].Hparams, n_layers=30)
        # ENCORE's own default (its MPES, v_argmax_patience=2) is not inherited: it is the method's
        own_defaults = {f.name for f in dataclasses.fields(type(hp))
                        if f.default != getattr(type(ref), f.name, f.default)}
        shared = fields(type(hp)) & fields(type(ref)) - own_defaults
        assert {k: getattr(hp, k) for k in shared} == {k: getattr(ref, k) for k in shared}, model


def test_the_methods_own_keys_win_over_inherited_ones_and_the_command_line_over_both():
    own = OmegaConf.create({"name": "emmet", "inherit": "memit", "v_lr": 0.3,
                            "per_model": {"gpt2": {"mom2_update_weight": 5, "emmet_lambda": 0.5, "v_lr": 0.2}}})
    hp = resolve_hparams(own, "gpt2", METHODS["emmet"].Hparams)
    assert (hp.layers, hp.mom2_update_weight, hp.emmet_lambda, hp.v_lr) == ([3, 4, 5], 5, 0.5, 0.3)
    assert resolve_hparams(own, "tiny-gpt2", METHODS["emmet"].Hparams).mom2_update_weight == 100  # memit's
    assert resolve_hparams(compose("method=emmet").method, "smollm2-135m",
                           METHODS["emmet"].Hparams).mom2_update_weight == 2000  # not the 15000 it once copied


def test_inherited_keys_the_method_does_not_read_are_dropped():
    assert "mom2_update_weight" not in fields(METHODS["alphaedit"].Hparams)
    assert "mom2_update_weight" in compose("method=memit").method.per_model["tiny-gpt2"]
    hp = resolve_hparams(compose("method=alphaedit").method, "tiny-gpt2", METHODS["alphaedit"].Hparams)
    assert hp.layers == [1, 2] and hp.mom2_n_tokens == 2000
    own = OmegaConf.create({"name": "alphaedit", "inherit": "memit", "per_model": {"gpt2": {"mom2_update_weight": 1}}})
    with pytest.raises(ValueError, match=r"alphaedit: bad per_model row for 'gpt2'.*mom2_update_weight"):
        resolve_hparams(own, "gpt2", METHODS["alphaedit"].Hparams)  # its own rows are checked in full


def test_inherit_of_a_missing_method_or_of_itself_is_an_error():
    with pytest.raises(ValueError, match=r"emmet: inherit: 'memitt', but there is no .*memitt.yaml"):
        resolve_hparams(OmegaConf.create({"name": "emmet", "inherit": "memitt"}), "gpt2", METHODS["emmet"].Hparams)
    with pytest.raises(ValueError, match="inherit cycle memit -> memit"):
        resolve_hparams(OmegaConf.create({"name": "memit", "inherit": "memit"}), "gpt2", METHODS["memit"].Hparams)


def test_bad_per_model_row_names_method_and_model():
    method = OmegaConf.create({"name": "ft", "per_model": {"gpt2": {"layerz": [1]}}})
    with pytest.raises(ValueError, match=r"ft.*'gpt2'"):
        resolve_hparams(method, "gpt2", METHODS["ft"].Hparams)


def test_invalid_hparams_fail_validation():
    cfg = compose("method=ft", "model=gpt2", "method.anchor=somewhere")
    with pytest.raises(ValueError, match="anchor"):
        resolve_hparams(cfg.method, "gpt2", METHODS["ft"].Hparams)


def test_conf_ships_inside_the_package():
    assert (ROOT / "editlab" / "conf" / "config.yaml").exists()


@pytest.mark.parametrize("run", sorted(p.name for p in (ROOT / "docs" / "results").glob("*-smollm2-sample1")))
def test_the_curves_experiment_composes_the_committed_runs_settings(run):
    """``experiment=smollm2_curves`` is the documented way to rerun docs/results: it must compose the
    model, sample and eval schedule those runs recorded."""
    saved = json.loads((ROOT / "docs" / "results" / run / "config.json").read_text())
    cfg = compose("experiment=smollm2_curves", f"method={saved['method']['name']}",
                  f"sample.n_edits={saved['sample']['n_edits']}")
    for section in ("model", "sample", "eval"):
        assert OmegaConf.to_container(cfg[section], resolve=True) == saved[section], section
    assert cfg.tracker.name == "none" and cfg.checkpoint.every == 50


def test_the_long_stream_experiment_samples_its_forgetting_rounds():
    """``experiment=smollm2_long`` (issue 16's 5,000-edit stream): reduced-schema data, rounds over a
    fixed sample of 500 earlier edits, no fluency rounds (that schema has no generation prompts)."""
    cfg = compose("experiment=smollm2_long", "method=memit", "sample.n_edits=5000")
    assert cfg.data.counterfact.endswith("counterfact-edit.json") and cfg.model.name == "smollm2-135m"
    assert (cfg.eval.forget_every, cfg.eval.forget_sample, cfg.eval.fluency_every) == (100, 500, 0)
    assert cfg.sample.index == 1 and cfg.sample.n_edits == 5000 and cfg.checkpoint.every == 50


def test_the_long_stream_experiment_composes_the_committed_long_runs_settings():
    """The long MEMIT stream in docs/results was run with ``experiment=smollm2_long``."""
    saved = json.loads((ROOT / "docs" / "results" / "memit-smollm2-edit-sample1" / "config.json").read_text())
    cfg = compose("experiment=smollm2_long", "method=memit", f"sample.n_edits={saved['sample']['n_edits']}")
    for section in ("model", "sample", "eval"):
        assert OmegaConf.to_container(cfg[section], resolve=True) == saved[section], section
    assert cfg.data.counterfact == saved["data"]["counterfact"]


@pytest.mark.parametrize("experiment", ["smollm2_curves", "smollm2_long"])
def test_the_results_experiments_run_tiny(experiment, tmp_path, data_root):
    """Each experiment behind docs/results runs end to end on a tiny model, its schedule shrunk
    to a few edits: the data, rounds and summary it composes work together."""
    from editlab.run import run

    cfg = compose(f"experiment={experiment}", "model=tiny-llama", "method=ft", "method.steps=2",
                  "sample.n_edits=4", "eval.forget_every=2", "eval.downstream_every=4",
                  "eval.downstream_n=4", f"eval.fluency_every={4 if experiment == 'smollm2_curves' else 0}",
                  f"run_dir={tmp_path}")
    if experiment == "smollm2_long":
        cfg.eval.forget_sample = 1
    run(cfg, tmp_path)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["edit"] for r in recs] == [0, 1, 2, 3, 4]
    assert {"forget/frac"} <= recs[2].keys() and {"forget/frac"} <= recs[4].keys()
    if experiment == "smollm2_long":  # 1 of the 3 earlier edits scored at edit 4
        assert recs[4]["forget/n_earlier"] == 3 and recs[4]["forget/sampled"] == 1
    assert json.loads((tmp_path / "summary.json").read_text())["n_edits"] == 4
