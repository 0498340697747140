"""The Editor protocol and the Delta a method returns."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

from editlab.config import DataConfig
from editlab.data.requests import EditRequest
from editlab.deltas import Delta
from editlab.evaluate.scoring import encode
from editlab.models.loading import LoadedModel


@dataclass(frozen=True)
class EditorContext:
    """What an editor may need besides the model: where to cache, where the data is, the seed,
    and the model's layer count as its config gives it before the weights load (the layers of a
    model with no per_model row are chosen from it)."""

    cache_dir: Path
    data_root: Path
    seed: int
    wikitext: str = "wikitext/wikitext-2-raw"
    n_layers: Optional[int] = None
    counterfact: str = DataConfig.counterfact  # under data_root; the norm anchor's sample pool


class Editor(ABC):
    """A model-editing method.

    ``prepare`` runs once on the *unedited* model before the stream (and before a resumed run
    restores its deltas): validate every request and compute anything that must come from the
    base weights (key statistics).  ``apply`` computes the change for one step's requests and
    returns it without leaving it in the model: the stream applies it through its WeightWriter.
    """

    # Set by editlab.registry.register_method on the decorated class.
    name: ClassVar[str]
    Hparams: ClassVar[type]

    def __init__(self, hparams: Any, ctx: EditorContext):
        self.hp = hparams
        self.ctx = ctx

    def prepare(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> None:
        self.check_requests(lm, requests)

    def check_requests(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> None:
        for layer in getattr(self.hp, "layers", []):
            lm.table.mlp_out(layer)  # raises on a layer out of range or an unresolved template
        for r in requests:
            encode(lm.tok, r.rewrite_prompt, r.target_new)  # raises on an empty target
            encode(lm.tok, r.rewrite_prompt, r.target_true)

    @abstractmethod
    def apply(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> Delta: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name} carries no state but was given {sorted(state)}")
