"""Forgetting of earlier edits: re-score every earlier fact in padded batches.

What the scores mean: docs/architecture.md, "Metrics".

A fact is its rewrite prompt (efficacy) and, optionally, each paraphrase prompt; a prompt
"holds" when the new target has the lower mean per-token NLL (the ES/PS test of rewrite.py).
What held when the edit was made is recorded once; each forgetting round re-scores all earlier
facts in one padded pass (``score_pairs`` sorts and batches across facts) and reports how many of
those that held are now lost.  Per-edit history: the round at which each fact was first found
forgotten (its forget index) and every round's outcome vector.

Long streams may score a seeded sample instead (``eval.forget_sample``): each stream position has
a fixed random priority from ``forget_sample_seed`` alone, and a round scores the N earlier edits
of lowest priority.  The sample therefore depends on neither the method nor the stream length, so
every run of a sweep scores the same edits, and one round's sample mostly carries over to the
next.  Its standard errors (with the finite-population correction) are logged beside the means.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from editlab.data.requests import EditRequest
from editlab.evaluate.scoring import score_pairs

log = logging.getLogger(__name__)


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


def _se(p: float, m: int, population: int) -> float:
    """Standard error of a proportion ``p`` over ``m`` of ``population`` items drawn without
    replacement: zero when all were scored."""
    if m == 0 or math.isnan(p):
        return float("nan")
    fpc = (population - m) / (population - 1) if population > 1 else 0.0
    return math.sqrt(p * (1 - p) / m * fpc)


def sample_priority(seed: int, position: int) -> int:
    """The fixed random rank of a stream position in the forgetting sample (a hash, so it does
    not depend on how long the stream is or on any generator's state)."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def check_sample(sample: int) -> None:
    """``eval.forget_sample``: 0 (every earlier edit) or a sample size."""
    if sample < 0:
        raise ValueError(f"eval.forget_sample must be >= 0 (0 = every earlier edit), got {sample}")


class ForgetTracker:
    def __init__(self, paraphrase: bool = True, batch_size: int = 64, sample: int = 0, sample_seed: int = 0,
                 scorer: Callable[..., list[FactScore]] = fact_scores):
        check_sample(sample)
        self.paraphrase = paraphrase
        self.scorer = scorer  # (model, tok, requests, paraphrase, batch_size) -> a FactScore per request
        self.batch_size = batch_size
        self.sample = sample
        self.sample_seed = sample_seed
        self.made: list[FactScore] = []  # per edit in stream order, scored right after it was made
        self.forget_at: list[int | None] = []  # edit count of the round that first found it lost
        # {"edit", "idx": int32[m] stream positions scored, "es": bool[m], "ps": uint8[m] paraphrases held}
        self.rounds: list[dict[str, Any]] = []
        self._said_all = False

    def positions(self, n: int) -> list[int]:
        """The earlier edits a round after ``n`` of them scores, in stream order."""
        if not self.sample or self.sample >= n:
            if self.sample and not self._said_all:
                log.info("eval.forget_sample=%d is not below the %d earlier edits: scoring them all until "
                         "there are more", self.sample, n)
                self._said_all = True
            return list(range(n))
        ranked = sorted(range(n), key=lambda i: sample_priority(self.sample_seed, i))
        return sorted(ranked[:self.sample])

    def record(self, model, tok, requests: Sequence[EditRequest]) -> None:
        """Score the facts of a step just made (in stream order)."""
        self.made += self.scorer(model, tok, requests, self.paraphrase, self.batch_size)
        self.forget_at += [None] * len(requests)

    def round(self, model, tok, earlier: Sequence[EditRequest], now: int) -> dict[str, float]:
        """Re-score the first ``len(earlier)`` edits of the stream (or their sample) after ``now`` edits."""
        n = len(earlier)
        if n == 0:
            return {}
        if n > len(self.made):
            raise RuntimeError(f"forgetting round over {n} edits but only {len(self.made)} were recorded")
        idx = self.positions(n)
        cur = self.scorer(model, tok, [earlier[i] for i in idx], self.paraphrase, self.batch_size)
        made = [self.made[i] for i in idx]
        eligible = [k for k in range(len(idx)) if made[k].es]
        lost = [k for k in eligible if not cur[k].es]
        for k in lost:
            if self.forget_at[idx[k]] is None:
                self.forget_at[idx[k]] = now
        self.rounds.append({"edit": now, "idx": torch.tensor(idx, dtype=torch.int32),
                            "es": torch.tensor([c.es for c in cur], dtype=torch.bool),
                            "ps": torch.tensor([sum(c.ps) for c in cur], dtype=torch.uint8)})
        frac, retention = _frac(len(lost), len(eligible)), sum(c.es for c in cur) / len(idx)
        m = {"forget/n_earlier": n, "forget/eligible": len(eligible), "forget/count": len(lost),
             "forget/frac": frac, "forget/retention": retention}
        if self.sample:
            all_eligible = sum(f.es for f in self.made[:n])
            m.update({"forget/sampled": len(idx), "forget/frac_se": _se(frac, len(eligible), all_eligible),
                      "forget/retention_se": _se(retention, len(idx), n)})
        if self.paraphrase:
            held = [(k, j) for k in range(len(idx)) for j, h in enumerate(made[k].ps) if h]
            p_lost = sum(1 for k, j in held if not cur[k].ps[j])
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
                "round_idx": cat("idx", torch.int32), "round_es": cat("es", torch.bool),
                "round_ps": cat("ps", torch.uint8)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.made = [FactScore(bool(e), [bool(x) for x in p]) for e, p in zip(state["made_es"], state["made_ps"])]
        self.forget_at = list(state["forget_at"])
        n = [int(k) for k in state["round_n"]]
        es = torch.as_tensor(state["round_es"], dtype=torch.bool).split(n)
        ps = torch.as_tensor(state["round_ps"], dtype=torch.uint8).split(n)
        if "round_idx" in state:
            idx = torch.as_tensor(state["round_idx"], dtype=torch.int32).split(n)
        else:  # checkpoints from before sampled rounds: every round scored a whole prefix
            idx = [torch.arange(k, dtype=torch.int32) for k in n]
        self.rounds = [{"edit": int(e), "idx": i.clone(), "es": a.clone(), "ps": b.clone()}
                       for e, i, a, b in zip(state["round_edit"], idx, es, ps)]
