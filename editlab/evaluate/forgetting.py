"""Forgetting of earlier edits: re-score every earlier fact in padded batches.

What the scores mean: docs/architecture.md, "Metrics".

A fact is its rewrite prompt (efficacy) and, optionally, each paraphrase prompt; a prompt
"holds" when the new target has the lower mean per-token NLL (the ES/PS test of rewrite.py).
What held when the edit was made is recorded once; each forgetting round re-scores all earlier
facts in one padded pass (``score_pairs`` sorts and batches across facts) and reports how many of
those that held are now lost.  Per-edit history: the round at which each fact was first found
forgotten (its forget index) and every round's outcome vector.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from editlab.data.requests import EditRequest
from editlab.evaluate.scoring import score_pairs


@dataclass
class FactScore:
    es: bool  # the rewrite prompt holds
    ps: list[bool]  # each paraphrase prompt holds
    # The token accuracies behind es/ps where the scorer measures them (zsRE, evaluate/zsre.py:
    # a prompt holds when every target token is the argmax); None under the NLL test.
    acc: float | None = None
    ps_acc: list[float] | None = None


def fact_scores(model, tok, requests: Sequence[EditRequest], paraphrase: bool = True,
                batch_size: int = 64) -> list[FactScore]:
    """Scores of many facts from one padded scoring pass over all their prompts."""
    prompts = [[r.rewrite_prompt, *(r.paraphrase_prompts if paraphrase else ())] for r in requests]
    pairs = [(p, t) for r, ps in zip(requests, prompts) for p in ps for t in (r.target_new, r.target_true)]
    scores = iter(score_pairs(model, tok, pairs, batch_size=batch_size))
    out = []
    for ps in prompts:
        held = []
        for _ in ps:
            new, true = next(scores), next(scores)
            held.append(new.nll < true.nll)
        out.append(FactScore(held[0], held[1:]))
    return out


def _frac(num: int, den: int) -> float:
    return num / den if den else float("nan")


class ForgetTracker:
    def __init__(self, paraphrase: bool = True, batch_size: int = 64,
                 scorer: Callable[..., list[FactScore]] = fact_scores):
        self.paraphrase = paraphrase
        self.scorer = scorer  # (model, tok, requests, paraphrase, batch_size) -> a FactScore per request
        self.batch_size = batch_size
        self.made: list[FactScore] = []  # per edit in stream order, scored right after it was made
        self.forget_at: list[int | None] = []  # edit count of the round that first found it lost
        self.rounds: list[dict[str, Any]] = []  # {"edit", "es": bool[n], "ps": uint8[n] paraphrases held}

    def record(self, model, tok, requests: Sequence[EditRequest]) -> None:
        """Score the facts of a step just made (in stream order)."""
        self.made += self.scorer(model, tok, requests, self.paraphrase, self.batch_size)
        self.forget_at += [None] * len(requests)

    def round(self, model, tok, earlier: Sequence[EditRequest], now: int) -> dict[str, float]:
        """Re-score the first ``len(earlier)`` edits of the stream after ``now`` edits."""
        n = len(earlier)
        if n == 0:
            return {}
        if n > len(self.made):
            raise RuntimeError(f"forgetting round over {n} edits but only {len(self.made)} were recorded")
        cur = self.scorer(model, tok, earlier, self.paraphrase, self.batch_size)
        made = self.made[:n]
        eligible = [i for i in range(n) if made[i].es]
        lost = [i for i in eligible if not cur[i].es]
        for i in lost:
            if self.forget_at[i] is None:
                self.forget_at[i] = now
        self.rounds.append({"edit": now, "es": torch.tensor([c.es for c in cur], dtype=torch.bool),
                            "ps": torch.tensor([sum(c.ps) for c in cur], dtype=torch.uint8)})
        m = {"forget/n_earlier": n, "forget/eligible": len(eligible), "forget/count": len(lost),
             "forget/frac": _frac(len(lost), len(eligible)),
             "forget/retention": sum(c.es for c in cur) / n}
        if self.paraphrase:
            held = [(i, j) for i in range(n) for j, h in enumerate(made[i].ps) if h]
            p_lost = sum(1 for i, j in held if not cur[i].ps[j])
            n_prompts = sum(len(c.ps) for c in cur)
            m.update({"forget/para_eligible": len(held), "forget/para_count": p_lost,
                      "forget/para_frac": _frac(p_lost, len(held)),
                      "forget/para_retention": _frac(sum(sum(c.ps) for c in cur), n_prompts)})
        if cur[0].acc is not None:  # token-accuracy facts (zsRE): their mean accuracy now
            m["forget/rewrite_acc"] = sum(c.acc for c in cur) / len(cur)
            para = [a for c in cur for a in c.ps_acc or ()]
            if para:
                m["forget/rephrase_acc"] = sum(para) / len(para)
        return m

    def state_dict(self) -> dict[str, Any]:
        # Rounds packed into two flat tensors (a checkpoint holds two tensors, not two per round).
        def cat(key: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.cat([r[key] for r in self.rounds]) if self.rounds else torch.zeros(0, dtype=dtype)

        return {"made_es": [f.es for f in self.made], "made_ps": [list(f.ps) for f in self.made],
                "forget_at": list(self.forget_at),
                "round_edit": [r["edit"] for r in self.rounds], "round_n": [len(r["es"]) for r in self.rounds],
                "round_es": cat("es", torch.bool), "round_ps": cat("ps", torch.uint8)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.made = [FactScore(bool(e), [bool(x) for x in p]) for e, p in zip(state["made_es"], state["made_ps"])]
        self.forget_at = list(state["forget_at"])
        n = [int(k) for k in state["round_n"]]
        es = torch.as_tensor(state["round_es"], dtype=torch.bool).split(n)
        ps = torch.as_tensor(state["round_ps"], dtype=torch.uint8).split(n)
        self.rounds = [{"edit": int(e), "es": a.clone(), "ps": b.clone()}
                       for e, a, b in zip(state["round_edit"], es, ps)]
