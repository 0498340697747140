"""Fluency of free generation: the n-gram entropy of ROME's evaluation (Meng et al. 2022).

A collapsing model repeats itself, and its n-gram entropy falls.  Each round samples a fixed set
of CounterFact ``generation_prompts`` with one seed, so two rounds differ only by the weights:
top-k (k = 5) sampling up to 100 tokens including the prompt (the reference's ``generate_fast``),
and the text's fluency is the mean of 2/3·H₂ and 4/3·H₃, the entropies (bits) of its bigram and
trigram frequencies (the reference's ``compute_n_gram_entropy``).  Words are split by a regular
expression close to NLTK's ``word_tokenize``, which needs a model download that runs here must
not depend on; on CounterFact's generations the two differ only on rare contractions.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch

from editlab.evaluate.scoring import input_device
from editlab.models.kv_cache import cache_keyword

WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")
NGRAM_WEIGHTS = {2: 2 / 3, 3: 4 / 3}


def ngram_entropy(text: str, n: int) -> float:
    """Entropy in bits of the frequency distribution of ``text``'s word n-grams (0 if none)."""
    words = WORD.findall(text)
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def text_fluency(text: str) -> float:
    return sum(w * ngram_entropy(text, n) for n, w in NGRAM_WEIGHTS.items()) / len(NGRAM_WEIGHTS)


@torch.no_grad()
def sample_text(model, tok, prompt: str, max_len: int, top_k: int, gen: torch.Generator) -> str:
    """``prompt`` continued by top-k sampling until ``max_len`` tokens in all, decoded whole.

    One prompt at a time, so no padding can change what a token sees; the KV cache keeps it
    linear in length.
    """
    device = input_device(model)
    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    out = ids[0].tolist()
    cache_kw, past = cache_keyword(model), None
    while len(out) < max_len:
        res = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kw: past})
        past = getattr(res, cache_kw)
        top = torch.topk(res.logits[0, -1].float(), top_k)
        probs = torch.softmax(top.values, -1).cpu()
        nxt = int(top.indices[torch.multinomial(probs, 1, generator=gen)])
        out.append(nxt)
        ids = torch.tensor([[nxt]], device=device)
    return tok.decode(out, skip_special_tokens=True)


def generation_prompts(requests: Sequence, n: int) -> list[str]:
    """The first ``n`` generation prompts of the stream's records, in stream order."""
    prompts = [p for r in requests for p in r.generation_prompts][:n]
    if not prompts:
        raise ValueError("eval.fluency_every > 0, but the stream's records have no generation_prompts "
                         "(only CounterFact's original schema has them); set eval.fluency_every=0")
    return prompts


class FluencyEval:
    """A fixed set of generation prompts, sampled with the same seed every round."""

    def __init__(self, prompts: Sequence[str], max_len: int = 100, top_k: int = 5, seed: int = 0):
        self.prompts, self.max_len, self.top_k, self.seed = list(prompts), max_len, top_k, seed

    def round(self, model, tok) -> dict[str, float]:
        gen = torch.Generator().manual_seed(self.seed)
        scores = [text_fluency(sample_text(model, tok, p, self.max_len, self.top_k, gen)) for p in self.prompts]
        return {"gen/fluency": sum(scores) / len(scores)}
