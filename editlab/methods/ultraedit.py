"""UltraEdit (Gu et al. 2025, "UltraEdit: Training-, Subject-, and Memory-Free Lifelong Editing in
Language Models", arXiv 2505.14679), after the official ``editor/ultraedit.py`` (``cache`` and
``predict_param_shifts``) and ``nets.RunningMeanStd``.

One step (a "turn") of edits, on the current model:

1. Teacher-force every rewrite prompt + target_new and backpropagate the mean cross-entropy of
   all target tokens of the step.  At each edited linear layer, take its input k and the gradient
   g of the loss w.r.t. its output, at the positions that predict a target token (the prompt's
   last token and every target token but the last: the official ``token: ans`` mask).  Every
   layer's features come from this one pass, so from the same, pre-step model.
2. Merge [k ‖ g] into a lifelong running mean and std, one per weight shape (layers of one shape
   share it, as officially), kept for the whole stream in ``state_dict``.
3. Normalise with it: k̂, ĝ, and per token v = −lr·‖k̂‖²·ĝ.
4. ΔW = (KᵀK + ridge·I)⁻¹ KᵀV in float32 with the *raw* keys K: ΔW maps y = x W (``[in, out]``),
   so the parameter's delta in maths orientation [out, in] is ΔWᵀ = Vᵀ · (K (KᵀK + ridge·I)⁻¹).

Departures from the official code, both deliberate: the running statistics merge batches exactly
(Chan et al.'s parallel update; the official adds m·var_unbiased(x) where (m−1)·var_unbiased(x)
belongs, and is NaN for a one-token batch), and the loss is the mean over all target tokens of the
step (the official code averages within sub-batches of ``dataset.batch_size`` edits; the scale of
g cancels in the normalisation whenever it is constant over a stream).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence

import torch
import torch.nn.functional as F

from editlab.data.requests import EditRequest
from editlab.deltas import Delta
from editlab.evaluate.scoring import encode, final_hidden, input_device, pad_batch, soft_cap
from editlab.methods.base import Editor
from editlab.models.loading import LoadedModel
from editlab.registry import register_method


@dataclass(frozen=True)
class UltraEditHparams:
    # Layers whose MLP output projection (the architecture's mlp_out) is edited.
    layers: List[int] = field(default_factory=lambda: list(range(18, 27)))
    # Other projections of the MLP as "<its name in the MLP>:<layer>" (the official Llama-3 choice
    # edits gate_proj and up_proj): a list, so an override replaces a row's entries.
    mlp_modules: List[str] = field(default_factory=list)
    lr: float = 1e-6
    ridge: float = 1.0  # the identity the official solve adds to KᵀK

    def parsed_modules(self) -> list[tuple[str, int]]:
        out = []
        for entry in self.mlp_modules:
            name, _, layer = entry.rpartition(":")
            if not name or not layer.lstrip("-").isdigit():
                raise ValueError(f"ultraedit.mlp_modules: {entry!r} is not '<name in the MLP>:<layer>', "
                                 "e.g. 'gate_proj:11'")
            out.append((name, int(layer)))
        return out

    def validate(self) -> None:
        if self.lr <= 0 or self.ridge <= 0:
            raise ValueError(f"ultraedit needs lr > 0 and ridge > 0, got lr={self.lr}, ridge={self.ridge}")
        for where, items in (("layers", self.layers), ("mlp_modules", self.parsed_modules())):
            if len(set(items)) != len(items):
                raise ValueError(f"ultraedit.{where} repeats an entry: {list(getattr(self, where))}")
        if not self.layers and not self.mlp_modules:
            raise ValueError("ultraedit edits nothing: ultraedit.layers and ultraedit.mlp_modules are empty")


class RunningStats:
    """Count, mean and sum of squared deviations of feature rows, merged batch by batch exactly
    (float64), so that after any number of batches they are those of all rows seen."""

    def __init__(self, n: int, mean: torch.Tensor, m2: torch.Tensor):
        self.n, self.mean, self.m2 = n, mean.double(), m2.double()

    @classmethod
    def empty(cls, dim: int) -> RunningStats:
        return cls(0, torch.zeros(dim), torch.zeros(dim))

    def merged(self, x: torch.Tensor) -> RunningStats:
        """These statistics with the rows of ``x`` added (a new object: a failed step leaves the
        editor's statistics as they were)."""
        x = x.double().to(self.mean.device)
        m = x.shape[0]
        mean_x = x.mean(0)
        n, delta = self.n + m, mean_x - self.mean
        m2 = self.m2 + ((x - mean_x) ** 2).sum(0) + delta ** 2 * (self.n * m / n)
        return RunningStats(n, self.mean + delta * (m / n), m2)

    @property
    def std(self) -> torch.Tensor:
        """The unbiased std (as the official ``RunningMeanStd``); 0 before a second row."""
        return (self.m2 / (self.n - 1)).sqrt() if self.n > 1 else torch.zeros_like(self.m2)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(torch.float32).eps  # the official guard against a zero std
        mean, std = self.mean.to(x.device, torch.float32), self.std.to(x.device, torch.float32)
        return (x - mean) / (std + eps)


def ultraedit_solve(keys: torch.Tensor, values: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW = (KᵀK + ridge·I)⁻¹ KᵀV (``[in, out]``) as factors (Vᵀ, B) with ΔWᵀ = Vᵀ Bᵀ, float32.

    ``keys``: [n, in]; ``values``: [n, out].  B = (KᵀK + ridge·I)⁻¹ Kᵀ is [in, n].
    """
    k, v = keys.float(), values.float()
    gram = k.T @ k + ridge * torch.eye(k.shape[1], dtype=k.dtype, device=k.device)
    return v.T.contiguous(), torch.linalg.solve(gram, k.T)


@register_method("ultraedit", hparams=UltraEditHparams)
class UltraEditEditor(Editor):
    def __init__(self, hparams, ctx):
        super().__init__(hparams, ctx)
        self.stats: dict[str, RunningStats] = {}  # "<in>x<out>" -> the lifelong statistics

    def modules(self, lm: LoadedModel) -> list[str]:
        """The edited modules' names, each layer checked against the model (naming the field)."""
        names = []
        targets = [("layers", l, lm.table.mlp_out_name) for l in self.hp.layers] + [
            (f"mlp_modules[{m}:{l}]", l, lambda l, m=m: f"{lm.table.spec.mlp.format(l)}.{m}")
            for m, l in self.hp.parsed_modules()
        ]
        for where, layer, name_of in targets:
            try:
                lm.table.check_layer(layer)
                name = name_of(layer)
                lm.table.module(name)
            except ValueError as e:
                raise ValueError(f"ultraedit.{where}: {e}") from e
            if name in names:
                raise ValueError(f"ultraedit.{where}: {name} is already edited (ultraedit.layers names "
                                 "the MLP output projection)")
            names.append(name)
        return names

    def check_requests(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> None:
        self.modules(lm)  # before the base check, whose layer error does not name the field
        super().check_requests(lm, requests)

    def features(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> tuple[dict[str, tuple], float]:
        """{module: (K [n, in], G [n, out])} at the target-predicting positions, float32, from one
        teacher-forced pass of the current model; and the loss."""
        names = self.modules(lm)
        encs = [encode(lm.tok, r.rewrite_prompt, r.target_new) for r in requests]
        ids, mask = pad_batch([e.prompt + e.target[:-1] for e in encs], lm.tok.pad_token_id, input_device(lm.model))
        rows = [b for b, e in enumerate(encs) for _ in e.target]
        cols = [len(e.prompt) - 1 + j for e in encs for j in range(len(e.target))]
        targets = [t for e in encs for t in e.target]
        keys, probes, handles = {}, {}, []

        def hook(name):
            def capture(mod, args, out):
                keys[name] = args[0][rows, cols].detach().float()
                # The gradient w.r.t. a zero added to the output is the gradient w.r.t. the output,
                # with no path cut and no weight made trainable.
                probes[name] = torch.zeros_like(out, requires_grad=True)
                return out + probes[name]
            return capture

        try:
            for name in names:
                handles.append(lm.table.module(name).register_forward_hook(hook(name)))
            with torch.enable_grad():
                hidden = final_hidden(lm.model, ids, mask)
                head = lm.model.get_output_embeddings()
                picked = hidden[rows, cols].to(head.weight.device)
                logits = soft_cap(lm.model.config, head(picked)).float()
                loss = F.cross_entropy(logits, torch.tensor(targets, device=logits.device))
                grads = torch.autograd.grad(loss, [probes[n] for n in names])
        finally:
            for h in handles:
                h.remove()
        return {n: (keys[n], g[rows, cols].float()) for n, g in zip(names, grads)}, float(loss.detach())

    def apply(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> Delta:
        feats, loss = self.features(lm, requests)
        # Every layer's features enter the statistics before any is normalised (the official
        # cache() runs before predict_param_shifts()).
        stats = dict(self.stats)
        for k, g in feats.values():
            key = f"{k.shape[1]}x{g.shape[1]}"
            stats[key] = stats.get(key, RunningStats.empty(k.shape[1] + g.shape[1])).merged(torch.cat([k, g], 1).cpu())
        delta = Delta(info={"loss": loss, "tokens": float(next(iter(feats.values()))[0].shape[0])})
        for name, (k, g) in feats.items():
            z = stats[f"{k.shape[1]}x{g.shape[1]}"].normalize(torch.cat([k, g], 1))
            k_hat, g_hat = z.split([k.shape[1], g.shape[1]], 1)
            values = -self.hp.lr * (k_hat * k_hat).sum(1, keepdim=True) * g_hat
            weight = lm.table.module(name).weight
            a, b = ultraedit_solve(k.to(weight.device), values.to(weight.device), self.hp.ridge)
            delta.params[name + ".weight"], factors = lm.table.param_delta(a, b)
            delta.factors[name + ".weight"] = [factors]
        self.stats = stats
        return delta

    def state_dict(self):
        return {key: {"n": torch.tensor(s.n), "mean": s.mean, "m2": s.m2} for key, s in self.stats.items()}

    def load_state_dict(self, state):
        self.stats = {key: RunningStats(int(s["n"]), s["mean"], s["m2"]) for key, s in state.items()}
