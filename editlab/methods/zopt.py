"""The v*/z optimisation shared by ROME and MEMIT.

A vector δ is added to the output of one module (ROME: the edited MLP projection; MEMIT: the
residual stream after the last edited layer) at the subject's last token of every rewriting
prompt, and optimised so that the model predicts the new target (teacher-forced NLL), stays close
to its old next-token distribution on "{subject} is a" (KL), and keeps δ small (weight decay,
norm clamp) — kmeng01/rome ``compute_v`` / kmeng01/memit ``compute_z``.

Two ways to evaluate the model with δ, which give the same numbers:

- :class:`FullPass` (``fast=False``) runs the whole model on right-padded prompts and computes
  every logit, every step, as the reference does.  It defines what the fast path must equal.
- :class:`CachedSuffix` (``fast=True``, the default).  Positions before the subject's last token
  never depend on δ (attention is causal), nor does anything below the edited block.  Rows are
  left-aligned so that every subject's last token sits in one column; the prefix before that
  column is run through the model once, into a KV cache, and the suffix once more to capture
  what each block above the edit receives (its own mask, sliding window, rotary embedding and any
  other keyword, as the model's own forward builds them).  Each step then replays only those
  blocks on the suffix, from the cache, and applies the LM head only where the loss reads.
  Before it is used, a replay with δ = 0 must reproduce the model's own logits; where it does not
  (an architecture whose forward does more between blocks than pass the hidden state on),
  :class:`ReplayMismatch` is raised and the caller uses the full pass.

Several requests of one step (MEMIT's family, ``sample.batch_size`` > 1) are optimised together:
each has its own row of δ and its own loss; Adam is element-wise, so this is the same as
optimising them one after another, in one padded pass.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from editlab.data.requests import EditRequest
from editlab.evaluate.scoring import encode, pad_batch
from editlab.methods.keys import encode_at_subject, fill
from editlab.methods.tracing import edit_output
from editlab.models.kv_cache import cache_keyword
from editlab.models.loading import LoadedModel

log = logging.getLogger(__name__)

KL_PROMPT = "{} is a"


@dataclass
class TargetResult:
    target_init: torch.Tensor  # the module's output at the bare prompt's subject token
    delta: torch.Tensor
    info: dict[str, float] = field(default_factory=dict)

    @property
    def target(self) -> torch.Tensor:
        return self.target_init + self.delta


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """δ, the loss and Adam run in float32 at least (float64 where the model is)."""
    return torch.promote_types(dtype, torch.float32)


class ReplayMismatch(RuntimeError):
    """The cached-suffix replay does not reproduce the model's own logits on this architecture."""


@dataclass
class Problem:
    """The token rows of one or more requests: per request, every templated rewriting prompt
    followed by the target's tokens but the last, then the KL prompt.

    ``reads`` are the (row, column) positions the loss reads, in this order: every rewriting row's
    target tokens, row by row and token by token, then every KL row (at its subject's last token).
    """

    ids: list[list[int]]
    subject: list[int]  # per row: index of the subject's last token
    owner: list[int]  # per row: which request
    bare: list[int]  # per request: the row of its bare prompt (the first template, "{}")
    read_rows: list[int]
    read_cols: list[int]
    targets: list[int]  # the token each rewriting read should predict
    n_requests: int

    @property
    def n_target_reads(self) -> int:
        return len(self.targets)


def build_problem(tok, requests: Sequence[EditRequest], groups: Sequence[Sequence[str]]) -> Problem:
    ids, subject, owner, bare = [], [], [], []
    rw_rows, rw_cols, targets, kl_rows, kl_cols = [], [], [], [], []
    for r, req in enumerate(requests):
        target = list(encode(tok, req.rewrite_prompt, req.target_new).target)
        texts = [fill(t, req.prompt) for g in groups for t in g] + [KL_PROMPT]
        rows, lookup = encode_at_subject(tok, texts, [req.subject] * len(texts))
        bare.append(len(ids))
        for i, (row, subj) in enumerate(zip(rows, lookup)):
            n = len(ids)
            if i < len(texts) - 1:
                for j, t in enumerate(target):
                    rw_rows.append(n)
                    rw_cols.append(len(row) - 1 + j)
                    targets.append(t)
                row = row + target[:-1]
            else:
                kl_rows.append(n)
                kl_cols.append(subj)
            ids.append(row)
            subject.append(subj)
            owner.append(r)
    return Problem(ids, subject, owner, bare, rw_rows + kl_rows, rw_cols + kl_cols, targets, len(requests))


class FullPass:
    """The reference: the whole model, all logits, right-padded rows."""

    def __init__(self, lm: LoadedModel, problem: Problem, module: str):
        self.lm, self.p = lm, problem
        device = lm.device
        self.ids, self.mask = pad_batch(problem.ids, lm.tok.pad_token_id, device)
        self.module = lm.model.get_submodule(module)
        self.rows = torch.arange(len(problem.ids), device=device)
        self.cols = torch.tensor(problem.subject, device=device)
        self.owner = torch.tensor(problem.owner, device=device)
        self.read_rows = torch.tensor(problem.read_rows, device=device)
        self.read_cols = torch.tensor(problem.read_cols, device=device)
        bare = torch.tensor(problem.bare, device=device)
        seen = {}

        def record(out):
            seen["out"] = out[bare, self.cols[bare]].detach().to(_work_dtype(out.dtype)).clone()
            return out

        with torch.no_grad(), edit_output(self.module, record):
            self._forward()
        self.target_init = seen["out"]

    def _forward(self) -> torch.Tensor:
        return self.lm.model(input_ids=self.ids, attention_mask=self.mask, use_cache=False).logits

    def logits(self, delta: torch.Tensor) -> torch.Tensor:
        def add(out):
            out = out.clone()
            out[self.rows, self.cols] += delta[self.owner].to(out.dtype)
            return out

        with edit_output(self.module, add):
            out = self._forward()
        out = out[self.read_rows, self.read_cols]
        return out.to(_work_dtype(out.dtype))


class _CacheSnapshot:
    """The prefix state of a KV cache, put back before every replay.  Cache layers replace their
    tensors on update (torch.cat, slicing) rather than writing into them, so keeping references
    is enough; the δ = 0 check in :class:`CachedSuffix` would catch a cache that wrote in place."""

    def __init__(self, cache):
        self.parts = [(obj, dict(vars(obj))) for obj in [cache, *getattr(cache, "layers", [])]]
        self.lists = {id(obj): {k: list(v) for k, v in state.items() if isinstance(v, list)}
                      for obj, state in self.parts}

    def restore(self) -> None:
        for obj, state in self.parts:
            vars(obj).clear()
            vars(obj).update(state)
            vars(obj).update({k: list(v) for k, v in self.lists[id(obj)].items()})


def left_aligned(problem: Problem, column: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows padded on the left so that every subject's last token sits in ``column``:
    (ids, attention mask, positions)."""
    width = column + max(len(ids) - s for ids, s in zip(problem.ids, problem.subject))
    ids = torch.full((len(problem.ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (row, s) in enumerate(zip(problem.ids, problem.subject)):
        ids[i, column - s: column - s + len(row)] = torch.tensor(row)
        mask[i, column - s: column - s + len(row)] = 1
    # Explicit positions: a left-padded row must count its positions from its first real token.
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, mask, pos


class CachedSuffix:
    """The fast path: blocks from ``layer`` up replayed on the suffix only (see the module doc)."""

    def __init__(self, lm: LoadedModel, problem: Problem, module: str, layer: int, check_rtol: float = 1e-4):
        self.lm, self.p = lm, problem
        device = lm.device
        c = max(problem.subject)  # the shared column of every subject's last token
        ids, mask, pos = (t.to(device) for t in left_aligned(problem, c, lm.tok.pad_token_id))
        self.owner = torch.tensor(problem.owner, device=device)
        self.read_rows = torch.tensor(problem.read_rows, device=device)
        cols = [col - problem.subject[r] for r, col in zip(problem.read_rows, problem.read_cols)]
        self.read_cols = torch.tensor(cols, device=device)
        self.module = lm.model.get_submodule(module)
        self.blocks = list(lm.table.module(lm.table.spec.layers))[layer:]
        self.cache_kw = cache_keyword(lm.model)
        with torch.no_grad():
            cache = self._prefix_cache(ids[:, :c], mask[:, :c], pos[:, :c]) if c > 0 else None
            self.snapshot = _CacheSnapshot(cache) if cache is not None else None
            logits = self._capture_suffix(ids[:, c:], mask, pos[:, c:], cache)
        self._check_replay(logits, check_rtol)

    def _prefix_cache(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor):
        """The KV cache of the columns before the subjects' last tokens, which δ never changes."""
        out = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        return getattr(out, self.cache_kw)

    def _capture_suffix(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        """Run the model once on the suffix, keeping the edited module's output at the bare
        prompts' subject token (``target_init``) and what each replayed block receives; returns
        the model's own logits."""
        captured: list[tuple[tuple, dict]] = []
        handles = [b.register_forward_pre_hook(lambda m, a, k: captured.append((a, dict(k))), with_kwargs=True)
                   for b in self.blocks]
        bare = torch.tensor(self.p.bare, device=ids.device)
        seen = {}

        def record(out):
            seen["out"] = out[bare, 0].detach().to(_work_dtype(out.dtype)).clone()
            return out

        with_cache = {"use_cache": True, self.cache_kw: cache} if cache is not None else {"use_cache": False}
        try:
            with edit_output(self.module, record):
                logits = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, **with_cache).logits
        finally:
            for h in handles:
                h.remove()
        self.target_init = seen["out"]
        self._keep_block_inputs(captured)
        return logits

    def _keep_block_inputs(self, captured: list[tuple[tuple, dict]]) -> None:
        """Each block's own arguments but the hidden state, which the replay chains through from
        the first block's."""
        self.calls = []
        for args, kwargs in captured:
            hidden_kw = "hidden_states" in kwargs
            hidden = kwargs.pop("hidden_states") if hidden_kw else args[0]
            self.calls.append((hidden_kw, args if hidden_kw else args[1:], kwargs))
            if len(self.calls) == 1:
                self.hidden = hidden.detach()

    def _check_replay(self, logits: torch.Tensor, rtol: float) -> None:
        """A replay with δ = 0 must give the model's own logits at the reads, or the fast path
        is not used (:class:`ReplayMismatch`)."""
        expected = logits[self.read_rows, self.read_cols]
        expected = expected.to(_work_dtype(expected.dtype))
        with torch.no_grad():
            got = self.logits(torch.zeros_like(self.target_init))
        err = float((got - expected).norm() / expected.norm().clamp_min(1e-12))
        if not torch.isfinite(got).all() or err > rtol:
            raise ReplayMismatch(f"cached-suffix replay differs from the model's own logits by {err:.2e} (relative)")

    def logits(self, delta: torch.Tensor) -> torch.Tensor:
        def add(out):
            out = out.clone()
            out[:, 0] += delta[self.owner].to(out.dtype)
            return out

        if self.snapshot is not None:
            self.snapshot.restore()
        h = self.hidden
        with edit_output(self.module, add):
            for block, (hidden_kw, args, kwargs) in zip(self.blocks, self.calls):
                out = block(*args, hidden_states=h, **kwargs) if hidden_kw else block(h, *args, **kwargs)
                h = out[0] if isinstance(out, tuple) else out
        out = self.lm.table.logits(h[self.read_rows, self.read_cols])
        return out.to(_work_dtype(out.dtype))


def optimize_targets(lm: LoadedModel, requests: Sequence[EditRequest], groups: Sequence[Sequence[str]], module: str,
                     layer: int, hp, fast: bool = True, argmax_patience: int = 0,
                     bf16: bool = False) -> list[TargetResult]:
    """Optimise one δ per request at ``module`` (inside block ``layer``); see the module doc.

    ``hp`` needs v_lr, v_steps, v_weight_decay, clamp_norm_factor, kl_factor, early_stop_loss.
    ``argmax_patience`` > 0 also stops a request once every target token has been the argmax on
    every rewriting prompt for that many consecutive steps (ENCORE's most-probable early stopping).
    ``bf16`` runs the model under bfloat16 autocast (δ, the loss and Adam stay float32).
    With ``fast`` the requests share one padded pass (falling back to the reference's full
    passes where the replay cannot be proven equal); without it each runs alone, as the reference.
    Each result's ``info["v_fast"]`` says which path ran.
    """
    if fast:
        t0 = time.perf_counter()
        problem = build_problem(lm.tok, requests, groups)
        try:
            runner = CachedSuffix(lm, problem, module, layer)
        except ReplayMismatch as e:
            log.warning("%s; using the full pass for this step", e)
        else:
            return search_deltas(runner, problem, hp, argmax_patience, bf16, t0)
    out = []
    for req in requests:
        t0 = time.perf_counter()
        problem = build_problem(lm.tok, [req], groups)
        out += search_deltas(FullPass(lm, problem, module), problem, hp, argmax_patience, bf16, t0)
    return out


class Objective:
    """Every request's loss from the logits at the problem's reads: the NLL of its targets (mean
    over a row's target tokens, then over its rewriting rows), ``kl_factor`` times the KL of its
    KL prompt's next-token distribution from the first step's, and δ's weight decay relative to
    the unedited output's norm."""

    def __init__(self, p: Problem, hp, init: torch.Tensor):
        self.hp, self.n, self.n_t, self.n_rows = hp, p.n_requests, p.n_target_reads, len(p.ids)
        self.device, self.dtype = init.device, init.dtype
        read_rows = torch.tensor(p.read_rows, device=self.device)
        owner = torch.tensor(p.owner, device=self.device)
        self.targets = torch.tensor(p.targets, device=self.device)
        self.row_of_read = read_rows[:self.n_t]
        self.read_owner = owner[self.row_of_read]
        self.row_tokens = self._zeros(self.n_rows).index_add_(0, self.row_of_read, self._ones(self.n_t))
        self.rw_rows = torch.unique(self.row_of_read)
        self.rw_owner = owner[self.rw_rows]
        self.rw_per_req = self._zeros(self.n).index_add_(0, self.rw_owner, self._ones(len(self.rw_rows)))
        self.kl_owner = owner[read_rows[self.n_t:]]
        self.kl_per_req = self._zeros(self.n).index_add_(0, self.kl_owner, self._ones(len(self.kl_owner)))
        self.init_norm = init.norm(dim=1)
        self.kl_init: torch.Tensor | None = None  # the KL prompts' log-probabilities at the first call

    def _zeros(self, k: int) -> torch.Tensor:
        return torch.zeros(k, device=self.device, dtype=self.dtype)

    def _ones(self, k: int) -> torch.Tensor:
        return torch.ones(k, device=self.device, dtype=self.dtype)

    def __call__(self, sel: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, nll, kl) per request for the logits ``sel`` read with ``delta``."""
        nll, kl = self.nll(sel[:self.n_t]), self.kl(sel[self.n_t:])
        wd = self.hp.v_weight_decay * delta.norm(dim=1) / self.init_norm ** 2
        return nll + kl + wd, nll, kl

    def nll(self, target_logits: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(target_logits, -1).gather(1, self.targets[:, None])[:, 0]
        row_logp = self._zeros(self.n_rows).index_add(0, self.row_of_read, logp)
        row_nll = -row_logp[self.rw_rows] / self.row_tokens[self.rw_rows]
        return self._zeros(self.n).index_add(0, self.rw_owner, row_nll) / self.rw_per_req

    def kl(self, kl_logits: torch.Tensor) -> torch.Tensor:
        kl_logp = torch.log_softmax(kl_logits, -1)
        if self.kl_init is None:
            self.kl_init = kl_logp.detach().clone()
        kl_rows = (kl_logp.exp() * (kl_logp - self.kl_init)).sum(-1)  # KL(current ‖ initial), as the reference
        return self.hp.kl_factor * self._zeros(self.n).index_add(0, self.kl_owner, kl_rows) / self.kl_per_req

    def targets_are_argmax(self, sel: torch.Tensor) -> torch.Tensor:
        """Per request: whether every target token is the argmax where it is read."""
        miss = (sel[:self.n_t].argmax(-1) != self.targets).float()
        return torch.zeros(self.n, device=self.device).index_add_(0, self.read_owner, miss) == 0


def clamp_norms(delta: torch.Tensor, max_norm: torch.Tensor) -> None:
    """Scale each row of δ whose norm exceeds its bound back onto the bound, in place."""
    with torch.no_grad():
        norm = delta.norm(dim=1)
        over = norm > max_norm
        delta[over] *= (max_norm[over] / norm[over])[:, None]


def search_deltas(runner, p: Problem, hp, argmax_patience: int, bf16: bool, t0: float) -> list[TargetResult]:
    """Adam on every request's δ at once; a request whose loss is low enough (or whose targets
    stayed the argmax long enough) is frozen at that step's δ while the others go on."""
    init = runner.target_init
    n = p.n_requests
    objective = Objective(p, hp, init)
    max_norm = hp.clamp_norm_factor * objective.init_norm
    delta = torch.zeros_like(init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    autocast = torch.autocast(init.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    active = torch.ones(n, dtype=torch.bool, device=init.device)
    argmax_run = torch.zeros(n, dtype=torch.long, device=init.device)  # consecutive steps with every target the argmax
    final = torch.zeros_like(init)
    infos: list[dict[str, float]] = [{} for _ in range(n)]
    for it in range(hp.v_steps):
        opt.zero_grad(set_to_none=True)
        with autocast:
            sel = runner.logits(delta)
        sel = sel.to(init.dtype)
        loss, nll, kl = objective(sel, delta)
        stop = loss.detach() < hp.early_stop_loss
        if argmax_patience > 0:
            hit = objective.targets_are_argmax(sel)
            argmax_run = torch.where(hit, argmax_run + 1, torch.zeros_like(argmax_run))
            stop |= argmax_run >= argmax_patience
        if it == hp.v_steps - 1:
            stop[:] = True
        for r in torch.nonzero(active & stop).flatten().tolist():
            final[r] = delta.detach()[r]
            infos[r] = {"v_loss": float(loss[r].detach()), "v_nll": float(nll[r].detach()),
                        "v_kl": float(kl[r].detach()), "v_steps": it}
        active &= ~stop
        if not active.any():
            break
        loss[active].sum().backward()
        opt.step()
        clamp_norms(delta, max_norm)
    elapsed = (time.perf_counter() - t0) / n  # a batch's wall time, shared among its requests
    fast = float(isinstance(runner, CachedSuffix))
    return [TargetResult(init[r].clone(), final[r].clone(), {**infos[r], "v_time_s": elapsed, "v_fast": fast})
            for r in range(n)]
