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
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from editlab.data.requests import EditRequest
from editlab.evaluate.scoring import encode, pad_batch
from editlab.methods.keys import encode_at_subject, fill
from editlab.methods.tracing import edit_output
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


def _cache_kwarg(model) -> str:
    """transformers 5 calls the KV cache ``cache``; 4.x called it ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


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


class CachedSuffix:
    """The fast path: blocks from ``layer`` up replayed on the suffix only (see the module doc)."""

    def __init__(self, lm: LoadedModel, problem: Problem, module: str, layer: int, check_rtol: float = 1e-4):
        self.lm, self.p = lm, problem
        model, table = lm.model, lm.table
        device = lm.device
        c = max(problem.subject)  # the shared column of every subject's last token
        width = c + max(len(ids) - s for ids, s in zip(problem.ids, problem.subject))
        ids = torch.full((len(problem.ids), width), lm.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (row, s) in enumerate(zip(problem.ids, problem.subject)):
            ids[i, c - s: c - s + len(row)] = torch.tensor(row)
            mask[i, c - s: c - s + len(row)] = 1
        # Explicit positions: a left-padded row must count its positions from its first real token.
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
        self.owner = torch.tensor(problem.owner, device=device)
        self.read_rows = torch.tensor(problem.read_rows, device=device)
        self.read_cols = torch.tensor([col - problem.subject[r] for r, col in zip(problem.read_rows, problem.read_cols)],
                                      device=device)
        self.module = model.get_submodule(module)
        self.blocks = list(table.module(table.spec.layers))[layer:]
        cache_kw = _cache_kwarg(model)

        with torch.no_grad():
            cache = None
            if c > 0:
                out = model(input_ids=ids[:, :c], attention_mask=mask[:, :c], position_ids=pos[:, :c], use_cache=True)
                cache = out.past_key_values if cache_kw == "past_key_values" else out.cache
            self.snapshot = _CacheSnapshot(cache) if cache is not None else None
            captured: list[tuple[tuple, dict]] = []
            handles = [b.register_forward_pre_hook(lambda m, a, k: captured.append((a, dict(k))), with_kwargs=True)
                       for b in self.blocks]
            bare = torch.tensor(problem.bare, device=device)
            seen = {}

            def record(out):
                seen["out"] = out[bare, 0].detach().to(_work_dtype(out.dtype)).clone()
                return out

            try:
                with edit_output(self.module, record):
                    full = model(input_ids=ids[:, c:], attention_mask=mask, position_ids=pos[:, c:],
                                 use_cache=cache is not None, **({cache_kw: cache} if cache is not None else {}))
            finally:
                for h in handles:
                    h.remove()
        self.target_init = seen["out"]
        # Each block's own arguments but the hidden state, which the replay chains through.
        self.calls = []
        for args, kwargs in captured:
            hidden_kw = "hidden_states" in kwargs
            hidden = kwargs.pop("hidden_states") if hidden_kw else args[0]
            self.calls.append((hidden_kw, args if hidden_kw else args[1:], kwargs))
            if len(self.calls) == 1:
                self.hidden = hidden.detach()
        expected = full.logits[self.read_rows, self.read_cols]
        expected = expected.to(_work_dtype(expected.dtype))
        with torch.no_grad():
            got = self.logits(torch.zeros_like(self.target_init))
        err = float((got - expected).norm() / expected.norm().clamp_min(1e-12))
        if not torch.isfinite(got).all() or err > check_rtol:
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


def optimize_target(lm: LoadedModel, req: EditRequest, groups: Sequence[Sequence[str]], module: str,
                    layer: int, hp, fast: bool = True, argmax_patience: int = 0, bf16: bool = False) -> TargetResult:
    """:func:`optimize_targets` for one request."""
    return optimize_targets(lm, [req], groups, module, layer, hp, fast, argmax_patience, bf16)[0]


def search_deltas(runner, p: Problem, hp, argmax_patience: int, bf16: bool, t0: float) -> list[TargetResult]:
    """Adam on every request's δ at once; a request whose loss is low enough (or whose targets
    stayed the argmax long enough) is frozen at that step's δ while the others go on."""
    init = runner.target_init
    device, n = init.device, p.n_requests
    n_t = p.n_target_reads
    read_rows = torch.tensor(p.read_rows, device=device)
    owner = torch.tensor(p.owner, device=device)
    tgt = torch.tensor(p.targets, device=device)
    # NLL: mean over a row's target tokens, then over the request's rewriting rows.
    row_of_read = read_rows[:n_t]
    row_tokens = torch.zeros(len(p.ids), device=device, dtype=init.dtype).index_add_(0, row_of_read, torch.ones(n_t, device=device, dtype=init.dtype))
    rw_rows = torch.unique(row_of_read)
    rw_per_req = torch.zeros(n, device=device, dtype=init.dtype).index_add_(0, owner[rw_rows], torch.ones(len(rw_rows), device=device, dtype=init.dtype))
    kl_owner = owner[read_rows[n_t:]]
    kl_per_req = torch.zeros(n, device=device, dtype=init.dtype).index_add_(0, kl_owner, torch.ones(len(kl_owner), device=device, dtype=init.dtype))
    init_norm = init.norm(dim=1)

    delta = torch.zeros_like(init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    kl_init = None
    active = torch.ones(n, dtype=torch.bool, device=device)
    argmax_run = torch.zeros(n, dtype=torch.long, device=device)
    final = torch.zeros_like(init)
    infos: list[dict[str, float]] = [{} for _ in range(n)]
    for it in range(hp.v_steps):
        opt.zero_grad(set_to_none=True)
        with autocast:
            sel = runner.logits(delta)
        sel = sel.to(init.dtype)
        logp = torch.log_softmax(sel[:n_t], -1).gather(1, tgt[:, None])[:, 0]
        row_logp = torch.zeros(len(p.ids), device=device, dtype=init.dtype).index_add(0, row_of_read, logp)
        row_nll = -row_logp[rw_rows] / row_tokens[rw_rows]
        nll = torch.zeros(n, device=device, dtype=init.dtype).index_add(0, owner[rw_rows], row_nll) / rw_per_req
        kl_logp = torch.log_softmax(sel[n_t:], -1)
        if kl_init is None:
            kl_init = kl_logp.detach().clone()
        kl_rows = (kl_logp.exp() * (kl_logp - kl_init)).sum(-1)  # KL(current ‖ initial), as the reference
        kl = hp.kl_factor * torch.zeros(n, device=device, dtype=init.dtype).index_add(0, kl_owner, kl_rows) / kl_per_req
        wd = hp.v_weight_decay * delta.norm(dim=1) / init_norm ** 2
        loss = nll + kl + wd
        stop = loss.detach() < hp.early_stop_loss
        if argmax_patience > 0:
            miss = (sel[:n_t].argmax(-1) != tgt).float()
            hit = torch.zeros(n, device=device).index_add_(0, owner[row_of_read], miss) == 0
            argmax_run = torch.where(hit, argmax_run + 1, torch.zeros_like(argmax_run))
            stop |= argmax_run >= argmax_patience
        if it == hp.v_steps - 1:
            stop[:] = True
        for r in torch.nonzero(active & stop).flatten().tolist():
            final[r] = delta.detach()[r]
            infos[r] = {"v_loss": float(loss[r].detach()), "v_nll": float(nll[r].detach()), "v_kl": float(kl[r].detach()), "v_steps": it}
        active &= ~stop
        if not active.any():
            break
        loss[active].sum().backward()
        opt.step()
        with torch.no_grad():
            max_norm = hp.clamp_norm_factor * init_norm
            norm = delta.norm(dim=1)
            over = norm > max_norm
            delta[over] *= (max_norm[over] / norm[over])[:, None]
    elapsed = (time.perf_counter() - t0) / n  # a batch's wall time, shared among its requests
    fast = float(isinstance(runner, CachedSuffix))
    return [TargetResult(init[r].clone(), final[r].clone(), {**infos[r], "v_time_s": elapsed, "v_fast": fast})
            for r in range(n)]
