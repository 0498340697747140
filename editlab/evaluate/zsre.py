"""zsRE scores: token-level top-1 accuracy, the metric of ROME/MEMIT's and EasyEdit's zsRE evaluation.

A (prompt, answer) pair is teacher-forced as ``prompt + " " + answer`` (``scoring.encode``); its
accuracy is the fraction of the answer's tokens that are the argmax at their position.  Per request
(docs/evaluation.md, "zsRE"):

* ``rewrite_acc``: the new answer on the question;
* ``rephrase_acc``: the new answer on the rephrased question;
* ``loc_vs_unedited``: on the NQ question teacher-forced with its answer, the fraction of answer
  positions whose argmax equals the *unedited* model's argmax there (EasyEdit's locality): 1.0
  before any edit, by construction;
* ``loc_vs_nq``: the accuracy of the NQ answer itself (ROME's neighborhood score), which is what the
  unedited model gets right of the NQ answer and so below 1.0 before any edit.

The unedited model's predictions are taken when the scorer is built, which the evaluator does before
the first edit (and, on a resume, before the deltas are restored), so they are those of the base
weights.  Forgetting rounds re-score earlier edits with the same accuracy: a prompt *holds* when
every token of the new answer is the argmax (``facts``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from editlab.data.requests import EditRequest
from editlab.evaluate.forgetting import FactScore
from editlab.evaluate.scoring import encode, target_logits

METRICS = ("rewrite_acc", "rephrase_acc", "loc_vs_unedited", "loc_vs_nq")

Tokens = tuple[int, ...]


@torch.no_grad()
def argmax_tokens(model, tok, pairs: Sequence[tuple[str, str]], batch_size: int = 64) -> list[tuple[Tokens, Tokens]]:
    """Per (prompt, answer) pair: the argmax token at each answer position under teacher forcing,
    and the answer's tokens, from padded passes sorted by length (as ``score_pairs``)."""
    enc = [encode(tok, p, t) for p, t in pairs]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i].prompt) + len(enc[i].target))
    out: dict[int, tuple[Tokens, Tokens]] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        logits, _, owner = target_logits(model, [enc[i] for i in idx], tok.pad_token_id)
        preds: list[list[int]] = [[] for _ in idx]
        for b, p in zip(owner.tolist(), logits.argmax(-1).tolist()):
            preds[b].append(p)  # in target order: target_logits lists each pair's tokens in turn
        for b, i in enumerate(idx):
            out[i] = (tuple(preds[b]), enc[i].target)
    return [out[i] for i in range(len(enc))]


def agreement(pred: Tokens, ref: Tokens) -> float:
    """Fraction of positions where the two token sequences agree."""
    return sum(p == r for p, r in zip(pred, ref, strict=True)) / len(ref)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class ZsreScorer:
    """New-edit and forgetting scores of zsRE requests (see the module docstring)."""

    metrics = METRICS  # per-request keys, windowed like CounterFact's es/ps/ns
    efficacy = "rewrite_acc"  # the curve collapse detection follows

    def __init__(self, model, tok, requests: Sequence[EditRequest], batch_size: int = 64):
        """Records the unedited model's predictions on every request's locality prompts: build it
        on the unedited model."""
        self.batch_size = batch_size
        pairs = [(p, a) for r in requests for p, a in self._loc(r)]
        preds = iter(argmax_tokens(model, tok, pairs, batch_size))
        self.unedited: dict[int, list[Tokens]] = {r.case_id: [next(preds)[0] for _ in self._loc(r)]
                                                   for r in requests}

    @staticmethod
    def _loc(r: EditRequest) -> list[tuple[str, str]]:
        return list(zip(r.neighborhood_prompts, r.neighborhood_answers, strict=True))

    def score(self, model, tok, requests: Sequence[EditRequest]) -> list[dict[str, float]]:
        """One dict of the four accuracies per request, all prompts in one padded pass."""
        kinds = [[("rewrite", r.rewrite_prompt, r.target_new)]
                 + [("para", p, r.target_new) for p in r.paraphrase_prompts]
                 + [("loc", p, a) for p, a in self._loc(r)] for r in requests]
        preds = iter(argmax_tokens(model, tok, [(p, t) for ks in kinds for _, p, t in ks], self.batch_size))
        out = []
        for r, ks in zip(requests, kinds):
            acc: dict[str, list[float]] = {"rewrite": [], "para": [], "loc": [], "unedited": []}
            for kind, _, _ in ks:
                pred, target = next(preds)
                acc[kind].append(agreement(pred, target))
                if kind == "loc":
                    acc["unedited"].append(agreement(pred, self.unedited[r.case_id][len(acc["unedited"])]))
            m = {"rewrite_acc": acc["rewrite"][0]}
            for name, kind in (("rephrase_acc", "para"), ("loc_vs_unedited", "unedited"), ("loc_vs_nq", "loc")):
                if acc[kind]:
                    m[name] = _mean(acc[kind])
            out.append(m)
        return out

    def facts(self, model, tok, requests: Sequence[EditRequest], paraphrase: bool = True,
              batch_size: int = 64) -> list[FactScore]:
        """Forgetting-round scores (``ForgetTracker``'s scorer): token accuracy of the new answer on
        the question and each rephrase; a prompt holds when all its answer tokens are the argmax."""
        prompts = [[r.rewrite_prompt, *(r.paraphrase_prompts if paraphrase else ())] for r in requests]
        preds = iter(argmax_tokens(model, tok, [(p, r.target_new) for r, ps in zip(requests, prompts) for p in ps],
                                   batch_size))
        out = []
        for ps in prompts:
            accs = [agreement(*next(preds)) for _ in ps]
            out.append(FactScore(es=accs[0] == 1.0, ps=[a == 1.0 for a in accs[1:]], acc=accs[0], ps_acc=accs[1:]))
        return out
