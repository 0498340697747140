"""Teacher-forced scoring of (prompt, target) pairs in padded batches.

Logits are computed only at the positions that predict target tokens: the base model gives the
final (normed) hidden states, and the unembedding is applied to the gathered rows only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editlab.models.arch import soft_cap


class TargetError(ValueError):
    """A target that cannot be scored (e.g. it tokenizes to nothing)."""


@dataclass(frozen=True)
class Encoded:
    prompt: tuple[int, ...]
    target: tuple[int, ...]


def encode(tok: PreTrainedTokenizerBase, prompt: str, target: str) -> Encoded:
    """Token ids of ``prompt`` and of `` target`` as the model would continue the prompt.

    Targets carry no leading space; the space belongs to the target's first token in BPE
    vocabularies.  We tokenize ``prompt + " " + target`` and keep the suffix after the prompt's
    tokens, falling back to encoding `` target`` alone when the tokenizer merges across the seam.
    """
    if not target.strip():  # " " + "" would still tokenize to a lone space token
        raise TargetError(f"target {target!r} is empty after prompt {prompt!r}")
    p = tok(prompt).input_ids
    full = tok(prompt + " " + target).input_ids
    if full[: len(p)] == p and len(full) > len(p):
        t = full[len(p):]
    else:
        t = tok(" " + target, add_special_tokens=False).input_ids
    if not t:
        raise TargetError(f"target {target!r} tokenizes to nothing after prompt {prompt!r}")
    return Encoded(tuple(p), tuple(t))


def input_device(model: PreTrainedModel) -> torch.device:
    """Where input ids go: the input embedding's device (a model split across devices has no
    single device, and its first parameter need not be the embedding)."""
    return model.get_input_embeddings().weight.device


def final_hidden(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw) -> torch.Tensor:
    """Last hidden states after the final norm (the input of the unembedding)."""
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw)
    return out.last_hidden_state


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask (positions of real tokens stay 0..n-1)."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


@dataclass
class PairScore:
    nll: float  # mean per-token negative log-likelihood of the target
    token_acc: float  # fraction of target tokens that are the argmax under teacher forcing


def target_logits(
    model: PreTrainedModel, encs: Sequence[Encoded], pad_id: int, last_token: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict each target token, in one padded forward.

    Returns ``(logits [n_target_tokens, vocab], targets, owner)``: per target token the logits it
    is read from, its id, and the index of the pair it belongs to.  With ``last_token`` every
    target token is read at the prompt's last position (the reference FT code's objective)
    instead of being teacher-forced.  Only those positions are unembedded.
    """
    # The last target token is never an input: drop it from the sequence.
    seqs = [e.prompt if last_token else e.prompt + e.target[:-1] for e in encs]
    ids, mask = pad_batch(seqs, pad_id, input_device(model))
    hidden = final_hidden(model, ids, mask)
    rows, cols, tgt = [], [], []
    for b, e in enumerate(encs):
        lp = len(e.prompt)
        for j, t in enumerate(e.target):
            rows.append(b)
            cols.append(lp - 1 if last_token else lp - 1 + j)
            tgt.append(t)
    # The last block and the unembedding may sit on other devices than the inputs.
    picked = hidden[torch.tensor(rows, device=hidden.device), torch.tensor(cols, device=hidden.device)]
    head = model.get_output_embeddings()
    logits = soft_cap(model.config, head(picked.to(head.weight.device))).float()
    return logits, torch.tensor(tgt, device=logits.device), torch.tensor(rows, device=logits.device)


def target_logprobs(
    model: PreTrainedModel, encs: Sequence[Encoded], pad_id: int, last_token: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of every target token, differentiable (see ``target_logits``).

    Returns ``(logp, hit, owner)``: per target token its log-probability, whether it is the
    argmax, and the index of the pair it belongs to.
    """
    logits, tgt_t, rows_t = target_logits(model, encs, pad_id, last_token)
    logp = torch.log_softmax(logits, dim=-1).gather(1, tgt_t[:, None])[:, 0]
    return logp, logits.argmax(-1) == tgt_t, rows_t


def mean_per_pair(values: torch.Tensor, owner: torch.Tensor, n_pairs: int) -> torch.Tensor:
    total = torch.zeros(n_pairs, device=values.device, dtype=values.dtype).index_add(0, owner, values)
    count = torch.zeros(n_pairs, device=values.device, dtype=values.dtype).index_add(0, owner, torch.ones_like(values))
    return total / count


def teacher_forced_nll(model: PreTrainedModel, encs: Sequence[Encoded], pad_id: int,
                       last_token: bool = False) -> torch.Tensor:
    """The editing loss of FT-C, LocFT-BF and MEND: the per-token NLL of each pair's target,
    averaged per pair first so that long targets do not outweigh short ones, then over pairs.
    Differentiable; ``last_token`` as in :func:`target_logits`."""
    logp, _, owner = target_logprobs(model, encs, pad_id, last_token)
    return mean_per_pair(-logp, owner, len(encs)).mean()


@torch.no_grad()
def score_pairs(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 64,
) -> list[PairScore]:
    """Teacher-forced NLL and argmax accuracy of each (prompt, target) pair."""
    enc = [encode(tok, p, t) for p, t in pairs]
    # Sorting by length keeps padding small; results are put back in the caller's order.
    order = sorted(range(len(enc)), key=lambda i: len(enc[i].prompt) + len(enc[i].target))
    scores: dict[int, PairScore] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        logp, hit, owner = target_logprobs(model, [enc[i] for i in idx], tok.pad_token_id)
        nll = mean_per_pair(-logp, owner, len(idx))
        acc = mean_per_pair(hit.float(), owner, len(idx))
        for b, i in enumerate(idx):
            scores[i] = PairScore(nll=float(nll[b]), token_acc=float(acc[b]))
    return [scores[i] for i in range(len(enc))]
