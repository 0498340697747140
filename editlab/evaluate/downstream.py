"""Few-shot GLUE downstream scores with the shared few-shot prefix computed once per round.

Every example of a task is ``prefix + example`` with the same prefix.  Each round (the weights
change between rounds) runs the prefix once, keeps its KV cache, and every batch continues from a
batch-sized copy of it: the examples are left-padded *after* the prefix (the padding is masked
and position ids are given explicitly, so every real token sits where it would in the unpadded
prompt), which also makes all prompts end in the same column, so greedy decoding and label-word
scoring append tokens in lockstep.

Two scores per task (docs/architecture.md, "Metrics"): ``f1_gen`` (the paper's: greedy-generate
a few tokens, parse the label word, unparseable = wrong, weighted F1) and ``f1_lik`` (the label
word with the highest total log-probability, weighted F1).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from transformers import DynamicCache

from editlab.data.glue import GlueExample, GlueTask, load_task
from editlab.evaluate.f1 import weighted_f1
from editlab.evaluate.scoring import input_device
from editlab.models.kv_cache import cache_keyword


@dataclass
class TokenizedTask:
    task: GlueTask
    labels: list[int]
    prefix: list[int]  # token ids shared by every prompt
    suffixes: list[list[int]]  # the rest of each prompt
    words: list[list[int]]  # token ids of each label word as a continuation of the prompt
    word_labels: list[int]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_task(tok, task: GlueTask, examples: Sequence[GlueExample]) -> TokenizedTask:
    """Prompts tokenized whole, as the reference does, then split at the longest shared prefix.

    BPE may merge across the seam between few-shot context and example (e.g. the context's
    closing blank line), so the cached prefix is the longest token prefix common to every full
    prompt, never the separately tokenized context.
    """
    ctx = tok(task.prefix).input_ids
    fulls = [tok(task.prefix + ex.text).input_ids for ex in examples]
    n = min([len(ctx)] + [min(_common_prefix(ctx, f), len(f) - 1) for f in fulls])
    words = [tok(" " + w, add_special_tokens=False).input_ids for w, _ in task.words]
    if any(not w for w in words):
        raise ValueError(f"task {task.name}: a label word tokenizes to nothing")
    return TokenizedTask(task, [ex.label for ex in examples], ctx[:n], [f[n:] for f in fulls],
                         words, [label for _, label in task.words])


def prefix_cache(model, prefix: Sequence[int]) -> DynamicCache | None:
    if not prefix:
        return None
    ids = torch.tensor([list(prefix)], device=input_device(model))
    return getattr(model(input_ids=ids, use_cache=True, logits_to_keep=1), cache_keyword(model))


def _expand(cache: DynamicCache | None, batch: int) -> DynamicCache:
    """A private batch-sized cache: the forward pass replaces each layer's tensors by their
    concatenation with the new keys/values, so broadcast views of the prefix (no copy) suffice
    and the shared prefix cache is never written."""
    if cache is None:
        return DynamicCache()
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in out.layers:
        layer.keys = layer.keys.expand(batch, -1, -1, -1)
        layer.values = layer.values.expand(batch, -1, -1, -1)
    return out


@torch.no_grad()
def predict_batch(model, seqs: Sequence[Sequence[int]], pad_id: int, cache: DynamicCache | None,
                  n_cached: int, gen_tokens: int, words: Sequence[Sequence[int]], eos_id: int | None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuations ``[B, gen_tokens]`` and label-word log-probabilities ``[B, n_words]``.

    ``seqs`` continue a prefix of ``n_cached`` tokens whose KV cache is ``cache`` (None: no prefix).
    Inputs go to the embedding's device; what is read off the logits stays on theirs (on a model
    split across devices the unembedding may sit elsewhere).
    """
    device = input_device(model)
    b, width = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(list(s))
        mask[i, width - len(s):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (n_cached + mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    full_mask = torch.cat([torch.ones((b, n_cached), dtype=torch.long, device=device), mask], 1)
    cache_kw = cache_keyword(model)

    def forward(x, m, p, past, keep):
        out = model(input_ids=x, attention_mask=m, position_ids=p, use_cache=True, logits_to_keep=keep,
                    **{cache_kw: past})
        return torch.log_softmax(out.logits.float(), -1), getattr(out, cache_kw)

    logp, past = forward(ids, full_mask, pos, _expand(cache, b), 1)
    last = logp[:, -1]
    word_lp = torch.zeros((b, len(words)), device=last.device)
    for j, w in enumerate(words):
        if len(w) == 1:
            word_lp[:, j] = last[:, w[0]]
            continue
        # Multi-token word: teacher-force it after the prompt (prompts end in the same column).
        tail = torch.tensor([list(w[:-1])] * b, device=device)
        m = torch.cat([full_mask, torch.ones_like(tail)], 1)
        p = torch.cat([pos, pos[:, -1:] + torch.arange(1, len(w), device=device)], 1)
        lp, _ = forward(torch.cat([ids, tail], 1), m, p, _expand(cache, b), len(w))
        target = torch.tensor(list(w), device=lp.device)
        word_lp[:, j] = lp.gather(2, target.expand(b, -1)[..., None])[..., 0].sum(1)
    gen = torch.zeros((b, gen_tokens), dtype=torch.long, device=device)
    m, p = full_mask, pos[:, -1:]
    for t in range(gen_tokens):
        gen[:, t] = last.argmax(-1).to(device)
        if t + 1 == gen_tokens:
            break
        m = torch.cat([m, torch.ones((b, 1), dtype=torch.long, device=device)], 1)
        p = p + 1
        lp, past = forward(gen[:, t:t + 1], m, p, past, 1)
        last = lp[:, -1]
    if eos_id is not None and gen_tokens:
        # Greedy generation stops at end-of-text: nothing after it is part of the answer.
        done = (gen == eos_id).cumsum(1) > 0
        gen = gen.masked_fill(done, eos_id)
    return gen.cpu(), word_lp.cpu()


@dataclass
class Predictions:
    gen: list[int]  # parsed labels, -1 = unparseable
    lik: list[int]
    texts: list[str]
    word_logprobs: torch.Tensor


class DownstreamEval:
    """One round = every configured task, scored on the model's current weights."""

    def __init__(self, lm, tasks: Sequence[tuple[GlueTask, Sequence[GlueExample]]], batch_size: int = 32,
                 gen_tokens: int = 3, generate: bool = True, likelihood: bool = True):
        self.lm = lm
        self.batch_size = batch_size
        self.gen_tokens = gen_tokens
        self.generate, self.likelihood = generate, likelihood
        self.tasks = [tokenize_task(lm.tok, t, ex) for t, ex in tasks]
        cfg = lm.model.config
        if cfg.model_type == "gpt2":  # learned absolute positions: a longer prompt cannot be run
            for tt in self.tasks:
                longest = len(tt.prefix) + max(map(len, tt.suffixes)) + gen_tokens
                if longest > cfg.n_positions:
                    raise ValueError(f"downstream task {tt.task.name}: prompts reach {longest} tokens, more "
                                     f"than the model's {cfg.n_positions} positions (eval.downstream_every=0 "
                                     "switches downstream rounds off)")

    @classmethod
    def from_dir(cls, lm, glue_dir: Path, names: Sequence[str], n: int, **kw) -> DownstreamEval:
        return cls(lm, [load_task(glue_dir, name, n) for name in names], **kw)

    def predict(self, tt: TokenizedTask, use_cache: bool = True, generate: bool | None = None) -> Predictions:
        generate = self.generate if generate is None else generate
        n_gen = self.gen_tokens if generate else 0
        model, tok = self.lm.model, self.lm.tok
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if use_cache:
            cache, n_cached, seqs = prefix_cache(model, tt.prefix), len(tt.prefix), tt.suffixes
        else:
            cache, n_cached, seqs = None, 0, [tt.prefix + s for s in tt.suffixes]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # little padding per batch
        gen = torch.zeros((len(seqs), n_gen), dtype=torch.long)
        wlp = torch.zeros((len(seqs), len(tt.words) if self.likelihood else 0))
        for start in range(0, len(order), self.batch_size):
            idx = order[start: start + self.batch_size]
            g, w = predict_batch(model, [seqs[i] for i in idx], pad, cache, n_cached, n_gen,
                                 tt.words if self.likelihood else [], tok.eos_token_id)
            gen[idx], wlp[idx] = g, w
        texts = [tok.decode(g, skip_special_tokens=True) for g in gen.tolist()] if generate else []
        return Predictions(
            gen=[tt.task.parse(t) for t in texts],
            lik=[tt.word_labels[j] for j in wlp.argmax(1).tolist()] if self.likelihood else [],
            texts=texts, word_logprobs=wlp)

    def round(self, use_cache: bool = True, generate: bool | None = None) -> dict[str, float]:
        generate = self.generate if generate is None else generate
        out: dict[str, float] = {}
        for tt in self.tasks:
            p = self.predict(tt, use_cache, generate)
            name = tt.task.name
            if generate:
                out[f"downstream/{name}/f1_gen"] = weighted_f1(tt.labels, p.gen)
                out[f"downstream/{name}/invalid"] = sum(x == -1 for x in p.gen) / len(p.gen)
            if self.likelihood:
                out[f"downstream/{name}/f1_lik"] = weighted_f1(tt.labels, p.lik)
        for kind in ("f1_gen", "f1_lik"):
            vals = [v for k, v in out.items() if k.endswith("/" + kind)]
            if vals:
                out[f"downstream/mean_{kind}"] = sum(vals) / len(vals)
        return out
