"""What the key–value editors (ROME, MEMIT and their descendants) share: their common
hyperparameters, context templates generated once from the unedited model, second-moment key
statistics, request checks, and temporarily writing updates into the model while later pieces of
the same step are computed."""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, List, Sequence

import torch

from editlab.data.counterfact import load_counterfact
from editlab.data.requests import EditRequest
from editlab.data.text import corpus_texts
from editlab.methods.base import Editor, EditorContext
from editlab.methods.keys import subject_last_index
from editlab.methods.norm_anchor import SEARCH_FIELDS, SEED, AnchorKey, NormAnchor, mlp_values, vstar_norms
from editlab.methods.stats import KeyStatistics
from editlab.methods.templates import generate_templates
from editlab.methods.zopt import TargetResult
from editlab.models.loading import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyValueHparams:
    """The hyperparameters every key–value editor reads: the edited layers, the v*/z search
    (editlab.methods.zopt), the context templates and the key statistics (mom2_*, which alone
    decide the statistics' cache file).  Defaults are the reference code's gpt2-xl values for ROME;
    MEMIT's family overrides the layers, clamp and templates.  Frozen: an editor never changes
    its hyperparameters, so a run's config says what it ran."""

    layers: List[int] = field(default_factory=lambda: [17])
    v_lr: float = 0.5
    v_steps: int = 20
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    # Opt-in speed (off reproduces the paper): bfloat16 autocast in the v*/z loop, and stopping
    # once the target has been the argmax on every prompt for this many steps (0 = off).
    v_bf16: bool = False
    v_argmax_patience: int = 0
    context_templates: List[List[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])  # [length, count]
    mom2_corpus: str = "wikitext"  # wikitext (local) | wikipedia (hub, via datasets)
    mom2_n_tokens: int = 100_000
    mom2_max_len: int = 128
    mom2_dtype: str = "float32"
    # Norm-anchor scaling (NAS; editlab.methods.norm_anchor), off = the paper's method: every v* is
    # rescaled to ν, the trimmed mean of ‖v*‖ over norm_anchor_samples CounterFact rewrites on the
    # unedited model; an edit with ‖v*‖ > norm_anchor_skip_factor·ν is refused as a failed edit.
    norm_anchor: bool = False
    norm_anchor_samples: int = 1000
    norm_anchor_trim: float = 0.05  # the share of the largest ‖v*‖ left out of ν
    norm_anchor_skip_factor: float = 2.0

    def validate(self) -> None:
        if self.norm_anchor_samples < 1 or not 0 <= self.norm_anchor_trim < 1 or self.norm_anchor_skip_factor < 1:
            raise ValueError("norm anchor needs norm_anchor_samples >= 1, 0 <= norm_anchor_trim < 1 and "
                             f"norm_anchor_skip_factor >= 1, got {self.norm_anchor_samples}, "
                             f"{self.norm_anchor_trim}, {self.norm_anchor_skip_factor}")


class KeyValueEditor(Editor):
    uses_stats: bool = True

    def __init__(self, hparams, ctx: EditorContext):
        super().__init__(hparams, ctx)
        self.templates: list[list[str]] | None = None
        self.stats = KeyStatistics(ctx.cache_dir, hparams.mom2_corpus)
        self.fast = True  # the cached-prefix v*/z optimisation (False = the reference's full passes)
        self.anchor = NormAnchor(ctx.cache_dir, hparams.norm_anchor_trim, hparams.norm_anchor_skip_factor) \
            if hparams.norm_anchor else None

    def prepare(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> None:
        super().prepare(lm, requests)
        for r in requests:
            subject_last_index(lm.tok, r.prompt, r.subject)
        if self.templates is None:
            self.templates = generate_templates(lm.model, lm.tok, self.hp.context_templates, seed=self.ctx.seed)
        if self.uses_stats:
            self.stats.ensure(
                lm, list(self.hp.layers), self.hp.mom2_n_tokens, self.hp.mom2_max_len, self.hp.mom2_dtype,
                lambda: corpus_texts(self.hp.mom2_corpus, self.ctx.data_root, self.ctx.wikitext),
            )
            for layer in self.hp.layers:
                check_nonsingular(self.stats.mom2(layer), layer)
        if self.anchor is not None:
            self.prepare_anchor(lm)

    def search_site(self, lm: LoadedModel) -> tuple[str, int]:
        """Where the v*/z search adds δ: (module name, its block)."""
        raise NotImplementedError

    def target_options(self) -> dict:
        """Extra keyword arguments of ``optimize_targets`` (descendants change the stopping rule)."""
        return {"argmax_patience": self.hp.v_argmax_patience}

    def prepare_anchor(self, lm: LoadedModel) -> None:
        """ν of the norm anchor, on the unedited model, from the cache or computed (norm_anchor.py)."""
        module, layer = self.search_site(lm)
        options = self.target_options()
        search = {f: getattr(self.hp, f) for f in SEARCH_FIELDS} | options
        key = AnchorKey(lm.model_id, layer, module, self.ctx.counterfact, self.hp.norm_anchor_samples, SEED,
                        json.dumps(search, sort_keys=True))

        def compute(requests):
            return vstar_norms(lm, requests, module, layer, self.hp, fast=self.fast, **options)

        self.anchor.ensure(lm, key, lambda: list(load_counterfact(self.ctx.data_root / self.ctx.counterfact).values()),
                           compute)

    def anchored(self, lm: LoadedModel, requests: Sequence[EditRequest],
                 results: list[TargetResult]) -> list[TargetResult]:
        """``results`` with v* rescaled to ν when the norm anchor is on (raises EditFailed past the
        skip bound), else as they are."""
        if self.anchor is None:
            return results
        module, layer = self.search_site(lm)
        return self.anchor.rescale(requests, results, mlp_values(lm, requests, results, module, layer))

    def state_dict(self):
        return {"templates": self.templates}

    def load_state_dict(self, state):
        self.templates = state.get("templates")

    def note_target_path(self, info: dict) -> None:
        """Where the v*/z search could not use the cached-suffix replay (zopt logged why), keep to
        the full pass for the rest of the run instead of trying the replay at every edit."""
        if self.fast and not info.get("v_fast", 1.0):
            log.warning("%s: the cached-suffix v*/z replay is off for this run", self.name)
            self.fast = False

    def flat_templates(self) -> list[str]:
        return [t for g in self.templates for t in g]


def check_nonsingular(c: torch.Tensor, layer: int) -> None:
    _, info = torch.linalg.cholesky_ex(c.double())
    if int(info) != 0:
        rank = int(torch.linalg.matrix_rank(c.double()))
        raise ValueError(
            f"key statistics C of layer {layer} are singular (rank {rank} < {c.shape[0]}); "
            "raise mom2_n_tokens so that there are more tokens than key dimensions"
        )


@contextmanager
def scratch_weights(params: dict[str, torch.nn.Parameter]) -> Iterator[dict[str, torch.Tensor]]:
    """Let a method write into weights while it computes a step, then put them back.

    Yields the original values; the editor's result is a Delta, applied by the stream's WeightWriter.
    """
    saved = {n: p.detach().clone() for n, p in params.items()}
    try:
        yield saved
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
