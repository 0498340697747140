"""WISE (Wang et al. 2024, "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing"),
WISE-Retrieve as EasyEdit's official ``hparams/WISE`` rows run it.  Weights stay untouched: one
MLP output projection gets a *side memory*, a trainable copy W' of its weight W (the *main
memory*), and a router chooses per sequence which of them produces the module's output.

**Editing** (one request at a time; each is one edit).  W' is trained for ``steps`` SGD steps on
the rewrite prompt behind each context template (``{}`` plus generated prefixes) completed with
the new target, plus one unrelated locality sentence (WikiText; the official code takes a held-out
NQ question), all passed through W'.  The loss is the target's teacher-forced NLL plus the
activation margin loss of :func:`margin_loss` on the distances between the module's output under W'
and under W.  Each step's gradient is masked by a fixed random mask (a ``mask_ratio`` share of
W's entries trainable, one mask per shard), and W' is clamped into ``W ± norm_constraint``.  The
mean in-scope distance at the last step is recorded; the side memory's *routing statistic* is the
minimum over its edits.

**Shards.** After every ``save_freq`` edits, W' (with its statistic) is saved as a shard and W'
restarts from W.  After every ``merge_freq`` edits the last ``merge_freq // save_freq`` shards are
TIES-merged (:mod:`editlab.methods.ties`) into one: base W, each weighted ``weights / count``, trimmed
to ``densities``; the merged shard's statistic is the minimum of theirs.

**Routing** (a forward hook on the module, registered by ``prepare``, as GRACE's adaptor).  A
sequence's distance to a memory is the mean over its tokens (the maximum, for a sequence longer
than 100 tokens) of ‖act(x W'ᵀ) − act(x Wᵀ)‖, act being the model's MLP activation.  The current
side memory is chosen when its distance reaches ``act_ratio`` × its statistic; a shard then wins
when its distance exceeds both the best distance so far and ``act_ratio`` × its own statistic.  A
sequence that no memory claims keeps the module's own output, bit for bit.

The memories and their statistics are the editor's state (checkpointed); a step's Delta has no
weights and reports the losses, the distances and the memories in its info.  See docs/methods.md
for where this follows the official code and where it does not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Sequence

import torch
from transformers.activations import ACT2FN

from editlab.data.requests import EditRequest
from editlab.data.text import wikitext_paragraphs
from editlab.deltas import Delta
from editlab.evaluate.scoring import encode, input_device, teacher_forced_nll
from editlab.methods.base import Editor
from editlab.methods.diagnostics import average_info
from editlab.methods.templates import generate_templates
from editlab.methods.ties import ties_merge
from editlab.methods.tracing import StopForward, trace
from editlab.models.loading import LoadedModel
from editlab.registry import register_method

LONG = 100  # a sequence longer than this is measured by its largest token distance (official)
# The official early stop: the loss changed by at most STOP_DELTA since the last step and is at most STOP_LOSS.
STOP_DELTA, STOP_LOSS = 1e-4, 2e-2
LOC_WORDS = (6, 30)  # locality sentences are WikiText sentences of this many words
LOC_POOL = 2000  # how many are read; edit e takes sentence e mod LOC_POOL
MAIN = -1  # the route of a sequence that keeps the module's own output


@dataclass
class WISEHparams:
    layers: List[int] = field(default_factory=lambda: [29])  # exactly one layer's MLP output projection
    lr: float = 0.9  # edit_lr (plain SGD)
    steps: int = 30  # n_iter
    weight_decay: float = 1e-5  # the official SGD's
    mask_ratio: float = 0.2  # share of the side memory's entries each shard trains
    alpha: float = 2.0  # act_margin[0]: out-of-scope distance should stay below alpha
    beta: float = 20.0  # act_margin[1]: in-scope distance should exceed beta
    gamma: float = 10.0  # act_margin[2]: in-scope should exceed out-of-scope by gamma
    act_ratio: float = 0.5
    norm_constraint: float = 1.0  # L∞ clamp of the side memory around the main memory
    save_freq: int = 500
    merge_freq: int = 1000
    densities: float = 0.53  # TIES trim density
    weights: float = 1.0  # total TIES weight, shared equally by the merged shards
    context_templates: List[List[int]] = field(default_factory=lambda: [[5, 5], [10, 5]])  # [length, count]

    def validate(self) -> None:
        if len(self.layers) != 1:
            raise ValueError(f"wise keeps a side memory of exactly one layer, got layers={self.layers}")
        if self.save_freq < 1 or self.merge_freq < 1 or self.merge_freq % self.save_freq:
            raise ValueError(f"wise needs merge_freq to be a multiple of save_freq (official: 1000 and 500), "
                             f"got save_freq={self.save_freq}, merge_freq={self.merge_freq}")
        if not 0 < self.mask_ratio <= 1 or not 0 < self.densities <= 1:
            raise ValueError(f"wise needs mask_ratio and densities in (0, 1], got {self.mask_ratio}, {self.densities}")
        if self.lr <= 0 or self.steps < 1 or self.norm_constraint <= 0 or self.act_ratio <= 0 or self.weights <= 0:
            raise ValueError("wise needs lr > 0, steps >= 1, norm_constraint > 0, act_ratio > 0 and weights > 0")


def positive_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x``'s positive entries, 0 when it has none (the official hinge)."""
    pos = x[x > 0]
    return pos.mean() if pos.numel() else x.new_zeros(())


def margin_loss(d_in: torch.Tensor, d_out: torch.Tensor, alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """The activation margin loss of WISE (its eq. 4, as the official code computes it).

    ``d_in`` are the in-scope sequences' distances (the templated prompts), ``d_out`` the
    out-of-scope ones (the locality sentence): [d_out − d_in + γ]₊ over all pairs, plus
    [d_out − α]₊ and [β − d_in]₊, each averaged over its positive entries only.
    """
    pairs = d_out.reshape(-1, 1) - d_in.reshape(1, -1) + gamma
    return positive_mean(pairs) + positive_mean(d_out - alpha) + positive_mean(beta - d_in)


def sequence_distance(a_main: torch.Tensor, a_side: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per sequence: the mean over its real tokens (``rows`` [B, T], 1 = token) of the per-token
    distance ‖a_side − a_main‖, or the maximum for a sequence longer than ``LONG`` tokens."""
    per_token = (a_side - a_main).norm(dim=-1)  # [B, T]
    n = rows.sum(1)
    mean = (per_token * rows).sum(1) / n.clamp(min=1)
    peak = per_token.masked_fill(rows == 0, -math.inf).max(1).values
    return torch.where(n > LONG, peak, mean)


def locality_sentences(folder: Path, n: int = LOC_POOL) -> list[str]:
    """The first ``n`` WikiText sentences of ``LOC_WORDS`` words: unrelated text, held out from
    every evaluation, that the side memory must leave to the main memory."""
    out: list[str] = []
    for para in wikitext_paragraphs(folder):
        for s in para.split(" . "):
            if LOC_WORDS[0] <= len(s.split()) <= LOC_WORDS[1]:
                out.append(s.strip() + " .")
                if len(out) == n:
                    return out
    if not out:
        raise ValueError(f"wise: no WikiText sentence of {LOC_WORDS} words in {folder}")
    return out


@register_method("wise", hparams=WISEHparams)
class WISEEditor(Editor):
    def __init__(self, hparams, ctx):
        super().__init__(hparams, ctx)
        self.side: torch.Tensor | None = None  # W', in the parameter's layout, float32
        self.side_act = math.inf  # its routing statistic (inf: no edit since the last save)
        self.shards: list[torch.Tensor] = []
        self.shard_acts: list[float] = []
        self.n_edits = 0
        self.merges = 0
        self.templates: list[list[str]] | None = None
        self._handles: list = []
        self._attention: torch.Tensor | None = None  # the running forward's attention mask
        self._training: dict | None = None  # set while W' is trained: the hook uses and records it
        self._mask: tuple[int, torch.Tensor] | None = None  # (shard index, its gradient mask)

    # -- the router ---------------------------------------------------------------------------
    def prepare(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> None:
        super().prepare(lm, requests)
        module = lm.table.mlp_out(self.hp.layers[0])
        config = lm.model.config
        self._transposed = lm.table.spec.transposed
        self._act = ACT2FN[getattr(config, "hidden_act", None) or config.activation_function]
        self._main = module.weight.detach().float().clone()  # prepare always sees the unedited model
        self._to_device()
        if self.side is None:
            self.side = self._main.clone()
        if self.templates is None:
            self.templates = generate_templates(lm.model, lm.tok, self.hp.context_templates, seed=self.ctx.seed)
        self._loc = locality_sentences(self.ctx.data_root / self.ctx.wikitext)
        if not self._handles:
            base = lm.model.base_model
            self._handles = [
                base.register_forward_pre_hook(self._keep_attention, with_kwargs=True),
                base.register_forward_hook(self._drop_attention, always_call=True),
                module.register_forward_hook(self._route),
            ]

    def close(self) -> None:
        """Remove the router from the model (the memories stay in the editor)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _keep_attention(self, module, args, kwargs):
        # The router averages over a sequence's real tokens, so a padded row is measured as it
        # would be alone; the layer itself is not given the 2-D mask, hence this pair of hooks.
        mask = kwargs.get("attention_mask")
        self._attention = mask if mask is not None and mask.dim() == 2 else None

    def _drop_attention(self, module, args, out):
        self._attention = None

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T] with 1 at real tokens (the last T columns of the mask, as in cached generation)."""
        m = self._attention
        if m is None or m.shape[0] != x.shape[0] or m.shape[1] < x.shape[1]:
            return torch.ones(x.shape[:2], device=x.device)
        return m[:, -x.shape[1]:].to(x.device, torch.float32)

    def _output(self, module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The module's output with ``weight`` in place of its own (float32; bias shared)."""
        w = weight.to(x.device)
        y = x.float() @ (w if self._transposed else w.T)
        bias = getattr(module, "bias", None)
        return y if bias is None else y + bias.float()

    def _route(self, module, args, out):
        x = args[0]
        if self._training is not None:
            side = self._output(module, x, self._training["weight"])
            self._training["seen"].append((self._act(out.detach().float()), self._act(side), self._rows(x)))
            return side.to(out.dtype)
        chosen, outputs = self.choose(module, x, out, self._rows(x))
        if not outputs or bool((chosen == MAIN).all()):
            return None
        routed = out
        for k, y in outputs.items():
            routed = torch.where((chosen == k)[:, None, None], y.to(out.dtype), routed)
        return routed

    def choose(self, module, x: torch.Tensor, out: torch.Tensor, rows: torch.Tensor):
        """Per sequence the memory that produces its output (``MAIN``, 0 for the side memory, i + 1
        for shard i) and the memories' outputs, by the official rule (module docstring)."""
        a_main = self._act(out.float())
        chosen = torch.full((len(x),), MAIN, dtype=torch.long, device=x.device)
        best = torch.zeros(len(x), device=x.device)
        outputs: dict[int, torch.Tensor] = {}
        ratio = self.hp.act_ratio
        if math.isfinite(self.side_act):  # else W' = W: distance 0, never chosen
            outputs[0] = self._output(module, x, self.side)
            best = sequence_distance(a_main, self._act(outputs[0]), rows)
            chosen[best >= ratio * self.side_act] = 0
        for i, (w, act) in enumerate(zip(self.shards, self.shard_acts)):
            outputs[i + 1] = self._output(module, x, w)
            d = sequence_distance(a_main, self._act(outputs[i + 1]), rows)
            take = (d > best) & (d > ratio * act)
            chosen[take] = i + 1
            best = torch.where(take, d, best)
        return chosen, outputs

    @torch.no_grad()
    def routes(self, lm: LoadedModel, texts: Sequence[str]) -> list[int]:
        """Which memory each text, alone, is routed to (``MAIN``, 0 side, i + 1 shard i)."""
        module = lm.table.mlp_out(self.hp.layers[0])
        name = lm.table.mlp_out_name(self.hp.layers[0])
        found = []
        for text in texts:
            ids = lm.tok(text, return_tensors="pt").input_ids.to(input_device(lm.model))
            with trace(lm.model, inputs=(name,), stop_after=name) as got:
                try:
                    lm.model(input_ids=ids, use_cache=False)
                except StopForward:
                    pass
            x = got["in:" + name]
            chosen, _ = self.choose(module, x, module.forward(x), torch.ones(x.shape[:2], device=x.device))
            found.append(int(chosen[0]))
        return found

    # -- editing ------------------------------------------------------------------------------
    def _gradient_mask(self) -> torch.Tensor:
        """The current shard's fixed random mask (1 = trainable), drawn from the run's seed and the
        shard's index, so a resumed run draws the same one."""
        shard = self.n_edits // self.hp.save_freq
        if self._mask is None or self._mask[0] != shard:
            gen = torch.Generator().manual_seed(self.ctx.seed * 1_000_003 + shard)
            mask = (torch.rand(self._main.shape, generator=gen) < self.hp.mask_ratio).float()
            self._mask = (shard, mask.to(self._main.device))
        return self._mask[1]

    def _forward_training(self, lm: LoadedModel, weight, encs, loc_ids, name):
        """One pass with ``weight`` as the module's: the templated NLL, and per sequence the
        activations under W and W' of the templates (in scope) and of the locality sentence."""
        self._training = {"weight": weight, "seen": []}
        try:
            nll = teacher_forced_nll(lm.model, encs, lm.tok.pad_token_id)
            with trace(lm.model, stop_after=name):
                try:
                    lm.model(input_ids=loc_ids, use_cache=False)
                except StopForward:
                    pass
            seen = self._training["seen"]
        finally:
            self._training = None
        d_in, d_out = (sequence_distance(*s) for s in seen)
        return nll, d_in, d_out

    def edit_one(self, lm: LoadedModel, req: EditRequest) -> dict[str, float]:
        hp = self.hp
        name = lm.table.mlp_out_name(hp.layers[0])
        encs = [encode(lm.tok, t.format(req.rewrite_prompt), req.target_new) for g in self.templates for t in g]
        loc = self._loc[self.n_edits % len(self._loc)]
        loc_ids = torch.tensor([lm.tok(loc).input_ids], device=input_device(lm.model))
        mask = self._gradient_mask()
        lo, hi = self._main - hp.norm_constraint, self._main + hp.norm_constraint
        weight = self.side.clone().requires_grad_(True)
        opt = torch.optim.SGD([weight], lr=hp.lr, weight_decay=hp.weight_decay)
        previous = last = math.inf
        for i in range(hp.steps):
            nll, d_in, d_out = self._forward_training(lm, weight, encs, loc_ids, name)
            act_loss = margin_loss(d_in, d_out, hp.alpha, hp.beta, hp.gamma)
            loss = nll + act_loss
            stop = abs(last - previous) <= STOP_DELTA and last <= STOP_LOSS
            if stop or i == hp.steps - 1:  # the statistic is read at the state training ends in
                in_scope = float(d_in.detach().mean())
            if stop:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            weight.grad.mul_(mask)
            opt.step()
            with torch.no_grad():
                weight.copy_(torch.clamp(weight, lo, hi))
            previous, last = last, float(loss.detach())
        self.side = weight.detach()
        self.side_act = min(self.side_act, in_scope)
        info = {"wise_loss": float(loss.detach()), "wise_nll": float(nll.detach()),
                "wise_act_loss": float(act_loss.detach()), "wise_steps": float(i + (not stop)),
                "wise_in_scope": in_scope, "wise_out_scope": float(d_out.detach().mean())}
        self.n_edits += 1
        if self.n_edits % hp.save_freq == 0:
            self._save_shard()
        if self.n_edits % hp.merge_freq == 0:
            self._merge_shards()
        return info

    def _save_shard(self) -> None:
        self.shards.append(self.side)
        self.shard_acts.append(self.side_act)
        self.side, self.side_act = self._main.clone(), math.inf

    def _merge_shards(self) -> None:
        """TIES-merge the last merge_freq // save_freq shards into one (the official WISE-Retrieve)."""
        count = self.hp.merge_freq // self.hp.save_freq  # 1 (merge_freq = save_freq): the shard is trimmed
        merged = ties_merge(self._main, self.shards[-count:], [self.hp.weights / count] * count, self.hp.densities)
        act = min(self.shard_acts[-count:])
        del self.shards[-count:], self.shard_acts[-count:]
        self.shards.append(merged)
        self.shard_acts.append(act)
        self.merges += 1

    def apply(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> Delta:
        if not self._handles:
            raise RuntimeError("wise needs prepare() to put its router on the model before apply()")
        info = average_info([self.edit_one(lm, r) for r in requests])
        ref = self._main.norm()
        info.update({
            "shards": float(len(self.shards)), "merges": float(self.merges),
            "edits_in_side": float(self.n_edits % self.hp.save_freq),
            "side_act": self.side_act if math.isfinite(self.side_act) else float("nan"),
            "side_distance": float((self.side - self._main).norm() / ref),
            "shard_distance_max": max((float((s - self._main).norm() / ref) for s in self.shards), default=0.0),
        })
        return Delta(info=info)

    # -- state ----------------------------------------------------------------------------------
    def _to_device(self) -> None:
        """The memories live with the module (a restored state arrives on the CPU)."""
        if hasattr(self, "_main"):
            dev = self._main.device
            self.side = None if self.side is None else self.side.to(dev, torch.float32)
            self.shards = [s.to(dev, torch.float32) for s in self.shards]

    def state_dict(self):
        return {"side": self.side, "side_act": torch.tensor(self.side_act, dtype=torch.float64),
                "shards": list(self.shards), "shard_acts": torch.tensor(self.shard_acts, dtype=torch.float64),
                "n_edits": self.n_edits, "merges": self.merges, "templates": self.templates}

    def load_state_dict(self, state):
        shards, acts = list(state.get("shards") or []), state.get("shard_acts")
        acts = [] if acts is None else [float(a) for a in acts.reshape(-1)]
        if len(shards) != len(acts):
            raise ValueError(f"wise state: {len(shards)} shards but {len(acts)} routing statistics")
        self.side, self.shards, self.shard_acts = state.get("side"), shards, acts
        self.side_act = float(state.get("side_act", math.inf))
        self.n_edits, self.merges = int(state.get("n_edits", 0)), int(state.get("merges", 0))
        self.templates = state.get("templates")
        self._mask = None
        self._to_device()
