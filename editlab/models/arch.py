"""Where the editable pieces live in each architecture.

Methods never branch on model names: they ask this table for the MLP output projection of a
layer (the matrix ROME/MEMIT/FT-C edit), its input projection, the final norm and the unembedding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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
        unembed="embed_out",
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


class ModuleTable:
    """An :class:`ArchSpec` bound to one model: resolves names to modules and checks layers."""

    def __init__(self, model: nn.Module):
        model_type = model.config.model_type
        if model_type not in ARCHS:
            raise ValueError(
                f"architecture {model_type!r} is not in editlab.models.arch.ARCHS "
                f"(known: {sorted(ARCHS)}); add its module names there"
            )
        self.model = model
        self.spec = ARCHS[model_type]
        self.n_layers = len(self.module(self.spec.layers))

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

    @property
    def final_norm(self) -> nn.Module:
        return self.module(self.spec.final_norm)

    @property
    def unembed(self) -> nn.Module:
        return self.module(self.spec.unembed)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on the last block's output: final norm, unembedding and, where the config
        asks for it (Gemma 2), tanh soft-capping of the logits, as the model's own forward does."""
        out = self.unembed(self.final_norm(hidden))
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            out = torch.tanh(out / cap) * cap
        return out
