"""Where the editable pieces live in each architecture.

Methods never branch on model names: they ask this table for the MLP output projection of a
layer (the matrix ROME/MEMIT/FT-C edit), its input projection, the final norm and the unembedding.

A model's names come from, in order: its yaml's ``model.arch`` entries, the ``ARCHS`` table by
``config.model_type``, or a probe of the module tree for a common layout (a new Llama-like model
then needs no code).  Every name is checked when the table is built, so a wrong one is an error at
load time, before any statistics are computed.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # the ModuleList of transformer blocks
    mlp_out: str  # MLP output projection of layer {} (the edited matrix)
    mlp: str  # the whole MLP of layer {}
    final_norm: str
    unembed: str
    embed: str
    transposed: bool = False  # GPT-2's Conv1D stores weight as [in, out]


ARCHS: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        layers="transformer.h",
        mlp_out="transformer.h.{}.mlp.c_proj",
        mlp="transformer.h.{}.mlp",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        embed="transformer.wte",
        transposed=True,
    ),
    "gptj": ArchSpec(
        layers="transformer.h",
        mlp_out="transformer.h.{}.mlp.fc_out",
        mlp="transformer.h.{}.mlp",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        embed="transformer.wte",
    ),
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers",
        mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        mlp="gpt_neox.layers.{}.mlp",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",  # transformers 5 renamed GPT-NeoX's embed_out
        embed="gpt_neox.embed_in",
    ),
}
_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    mlp_out="model.layers.{}.mlp.down_proj",
    mlp="model.layers.{}.mlp",
    final_norm="model.norm",
    unembed="lm_head",
    embed="model.embed_tokens",
)
for _t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "phi3"):
    ARCHS[_t] = _LLAMA_LIKE

# Layouts tried, in order, on a model_type missing from ARCHS.  GPT-2's names are shared by
# descendants that use nn.Linear, so its orientation is read from the module, not assumed.
PROBES: dict[str, ArchSpec] = {"llama-like": _LLAMA_LIKE, "gpt2-like": ARCHS["gpt2"]}

ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(ArchSpec))
_REQUIRED = ("layers", "mlp_out", "final_norm", "unembed", "embed")
_EXAMPLE = """  # conf/model/<name>.yaml ({} stands for the layer index)
  arch:
    layers: model.layers
    mlp_out: model.layers.{}.mlp.down_proj
    final_norm: model.norm
    unembed: lm_head
    embed: model.embed_tokens
    transposed: false  # true where the weight is stored [in, out] (GPT-2's Conv1D)"""


def _find(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _names(spec: ArchSpec) -> list[str]:
    """The module names of ``spec``, templates at layer 0."""
    return [spec.layers, spec.mlp_out.format(0), spec.mlp.format(0), spec.final_norm, spec.unembed, spec.embed]


def _missing(model: nn.Module, spec: ArchSpec) -> list[str]:
    """The names of ``spec`` that ``model`` does not have (the blocks must be a non-empty list)."""
    layers = _find(model, spec.layers)
    missing = [] if isinstance(layers, (nn.ModuleList, nn.Sequential)) and len(layers) else [spec.layers]
    return missing + [n for n in _names(spec)[1:] if _find(model, n) is None]


def _is_conv1d(model: nn.Module, spec: ArchSpec) -> bool:
    return isinstance(_find(model, spec.mlp_out.format(0)), Conv1D)


def probe(model: nn.Module) -> tuple[Optional[ArchSpec], dict[str, list[str]]]:
    """The first layout of :data:`PROBES` whose modules all exist, and what each probe missed."""
    missed = {}
    for label, spec in PROBES.items():
        missed[label] = _missing(model, spec)
        if not missed[label]:
            spec = dataclasses.replace(spec, transposed=_is_conv1d(model, spec))
            log.warning(
                "architecture %r is not in editlab.models.arch.ARCHS; probed its modules and found the "
                "%s layout: %s (set model.arch in the model's yaml to name them yourself)",
                model.config.model_type, label, spec,
            )
            return spec, missed
    return None, missed


def _no_layout_error(model: nn.Module, missed: dict[str, list[str]], given: Mapping[str, Any]) -> ValueError:
    probes = "\n".join(
        f"  {label}: {', '.join(_names(PROBES[label]))} (missing: {', '.join(missed[label])})"
        for label in PROBES
    )
    lacking = [f for f in _REQUIRED if f not in given]
    top = ", ".join(n for n, _ in model.named_children()) or "none"
    return ValueError(
        f"architecture {model.config.model_type!r} is not in editlab.models.arch.ARCHS and no probe "
        f"matched the modules of {type(model).__name__}:\n{probes}\n"
        f"Its top-level modules are: {top}.  Name its modules in model.arch "
        f"(missing: {', '.join(lacking)}), for example:\n{_EXAMPLE}"
    )


def resolve_spec(model: nn.Module, arch: Optional[Mapping[str, Any]] = None) -> tuple[ArchSpec, str]:
    """The spec for ``model`` and where it came from.  ``arch`` (``model.arch``; null entries are
    unset) overrides the table or probe entry by entry; a complete ``arch`` needs neither."""
    given = {k: v for k, v in (arch or {}).items() if v is not None}
    unknown = set(given) - set(ARCH_FIELDS)
    if unknown:
        raise ValueError(f"model.arch has unknown entries {sorted(unknown)}; known: {list(ARCH_FIELDS)}")
    if "mlp_out" in given and "mlp" not in given:
        given["mlp"] = given["mlp_out"].rsplit(".", 1)[0]  # the projection's parent is the MLP
    model_type = model.config.model_type
    if all(f in given for f in _REQUIRED):
        base, source = None, "model.arch"
    elif model_type in ARCHS:
        base, source = ARCHS[model_type], f"ARCHS[{model_type!r}]"
    else:
        base, missed = probe(model)
        if base is None:
            raise _no_layout_error(model, missed, given)
        source = "probed"
    names = {k: v for k, v in given.items() if k != "transposed"}
    spec = ArchSpec(**names) if base is None else dataclasses.replace(base, **names)
    if "transposed" in given:
        spec = dataclasses.replace(spec, transposed=bool(given["transposed"]))
    elif "mlp_out" in given:  # a projection named by hand: read its layout from its class
        spec = dataclasses.replace(spec, transposed=_is_conv1d(model, spec))
    if given and base is not None:
        source += " with model.arch"
    return spec, source


def soft_cap(config, logits: torch.Tensor) -> torch.Tensor:
    """Gemma 2's tanh soft-capping of the logits, which its forward applies after the head."""
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


class ModuleTable:
    """An :class:`ArchSpec` bound to one model: resolves names to modules and checks layers."""

    def __init__(self, model: nn.Module, arch: Optional[Mapping[str, Any]] = None):
        self.model = model
        self.spec, self.source = resolve_spec(model, arch)
        self._check_names()
        self.n_layers = len(self.module(self.spec.layers))

    def _check_names(self) -> None:
        """Every entry of the spec resolves (templates at layer 0): a wrong name fails here, at
        load time, naming the entry and the module instead of deep inside an edit."""
        s = self.spec
        for key in ("mlp_out", "mlp"):
            if "{}" not in getattr(s, key):
                raise ValueError(f"{self.source}: {key}={getattr(s, key)!r} needs '{{}}' where the layer index goes")
        layers = _find(self.model, s.layers)
        if not isinstance(layers, (nn.ModuleList, nn.Sequential)) or not len(layers):
            raise ValueError(self._absent("layers", s.layers, "a non-empty ModuleList of blocks"))
        for key in ("mlp_out", "mlp", "final_norm", "unembed", "embed"):
            name = getattr(s, key).format(0)
            if _find(self.model, name) is None:
                raise ValueError(self._absent(key, name))
        if getattr(self.module(s.mlp_out.format(0)), "weight", None) is None:
            raise ValueError(f"{self.source}: mlp_out={s.mlp_out!r} has no weight to edit")

    def _absent(self, key: str, name: str, what: str = "a module") -> str:
        """The error for a name that does not resolve, with what its deepest existing parent holds."""
        parent = name
        while parent and _find(self.model, parent) is None:
            parent = parent.rpartition(".")[0]
        children = ", ".join(n for n, _ in self.model.get_submodule(parent).named_children())
        return (f"{self.source}: {key}={name!r} is not {what} in {type(self.model).__name__} "
                f"({parent or 'the model'} has: {children or 'no submodules'})")

    def module(self, name: str) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"module {name!r} does not exist in {type(self.model).__name__}") from e

    def check_layer(self, layer: int) -> int:
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} is out of range: the model has layers 0..{self.n_layers - 1}")
        return layer

    def mlp_out_name(self, layer: int) -> str:
        return self.spec.mlp_out.format(self.check_layer(layer))

    def mlp_out(self, layer: int) -> nn.Module:
        return self.module(self.mlp_out_name(layer))

    def mlp_out_weight_name(self, layer: int) -> str:
        return self.mlp_out_name(layer) + ".weight"

    def mlp_out_weight(self, layer: int) -> nn.Parameter:
        return self.mlp_out(layer).weight

    def layer_module(self, layer: int) -> nn.Module:
        return self.module(self.spec.layers)[self.check_layer(layer)]

    def to_param(self, w_math: torch.Tensor) -> torch.Tensor:
        """A matrix in maths orientation [out, in] (y = W x) into the parameter's layout."""
        return w_math.T if self.spec.transposed else w_math

    def to_math(self, w_param: torch.Tensor) -> torch.Tensor:
        return w_param.T if self.spec.transposed else w_param

    def param_delta(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """A low-rank update ΔW = a bᵀ in maths orientation (``a: [out, k]``, ``b: [in, k]``) as
        the parameter's dense delta and its factors ``(a', b')`` with delta = a' b'ᵀ, both in the
        parameter's layout: GPT-2's Conv1D stores Wᵀ, whose delta is b aᵀ.  The dense delta is
        formed from the returned factors, in their dtype, so that the two agree exactly."""
        a, b = (b, a) if self.spec.transposed else (a, b)
        return a @ b.T, (a, b)

    @property
    def final_norm(self) -> nn.Module:
        return self.module(self.spec.final_norm)

    @property
    def unembed(self) -> nn.Module:
        return self.module(self.spec.unembed)

    @property
    def embed(self) -> nn.Module:
        return self.module(self.spec.embed)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on the last block's output: final norm, unembedding and, where the config
        asks for it (Gemma 2), tanh soft-capping of the logits, as the model's own forward does."""
        return soft_cap(self.model.config, self.unembed(self.final_norm(hidden)))
