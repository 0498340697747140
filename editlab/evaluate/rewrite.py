"""Efficacy, paraphrase and neighborhood scores of edit requests (docs/architecture.md,
"Metrics")."""
from __future__ import annotations

import math
from typing import Sequence

from editlab.data.requests import EditRequest
from editlab.evaluate.scoring import score_pairs

# Per-request metric names (each a mean over that request's prompts).
METRICS = ("es", "es_mag", "ps", "ps_mag", "ns", "ns_mag", "acc")


def _pairs(req: EditRequest, paraphrase: bool, neighborhood: bool) -> list[tuple[str, str, str]]:
    """(kind, prompt, target) triples; every prompt is scored under both targets."""
    prompts = [("rewrite", req.rewrite_prompt)]
    if paraphrase:
        prompts += [("para", p) for p in req.paraphrase_prompts]
    if neighborhood:
        prompts += [("neigh", p) for p in req.neighborhood_prompts]
    return [(kind, p, t) for kind, p in prompts for t in (req.target_new, req.target_true)]


def score_requests(
    model, tok, requests: Sequence[EditRequest], batch_size: int = 64,
    paraphrase: bool = True, neighborhood: bool = True,
) -> list[dict[str, float]]:
    """One dict of metrics per request, all prompts of all requests in one padded pass.

    ES: P(new) > P(true) on the rewrite prompt, comparing mean per-token NLLs; PS: the same on
    each paraphrase; NS: P(true) > P(new) on each neighborhood prompt.  ``*_mag`` are the
    probability differences with P = exp(-mean NLL) (the per-token geometric mean), signed so
    that positive is good; ``acc`` is the argmax accuracy of target_new's tokens on the rewrite
    prompt.  Metrics whose prompts are absent are omitted.
    """
    triples = [_pairs(r, paraphrase, neighborhood) for r in requests]
    flat = [(p, t) for tr in triples for _, p, t in tr]
    scores = iter(score_pairs(model, tok, flat, batch_size=batch_size))
    out = []
    for tr in triples:
        per_kind: dict[str, list[tuple[float, float]]] = {}
        acc = math.nan
        for kind, _, _ in tr[::2]:
            new, true = next(scores), next(scores)
            if kind == "rewrite":
                acc = new.token_acc
            per_kind.setdefault(kind, []).append((new.nll, true.nll))
        m: dict[str, float] = {"acc": acc}
        for kind, name, sign in (("rewrite", "es", 1), ("para", "ps", 1), ("neigh", "ns", -1)):
            if kind not in per_kind:
                continue
            vals = per_kind[kind]
            # success: the wanted target has the lower NLL (new for ES/PS, true for NS)
            m[name] = sum((sign * (t - n)) > 0 for n, t in vals) / len(vals)
            m[name + "_mag"] = sum(sign * (math.exp(-n) - math.exp(-t)) for n, t in vals) / len(vals)
        out.append(m)
    return out
