"""Keys (inputs of the edited projection) and values at a subject's last token."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from editlab.data.requests import EditRequest
from editlab.evaluate.scoring import pad_batch
from editlab.methods.tracing import StopForward, trace
from editlab.models.loading import LoadedModel


def fill(template: str, prompt: str) -> str:
    """Put a request prompt (with its own "{}" for the subject) into a context template."""
    return template.format(prompt)


def subject_last_index(tok, text: str, subject: str) -> int:
    """Index of the subject's last token in ``text.format(subject)`` (the reference's
    ``subject_last`` lookup: the length of the tokenized text up to and including the subject)."""
    if text.count("{}") != 1:
        raise ValueError(f"prompt {text!r} must contain exactly one '{{}}' for the subject")
    prefix = text[: text.index("{}")] + subject
    n = len(tok(prefix).input_ids)
    if n == 0:
        raise ValueError(f"subject {subject!r} tokenizes to nothing in {text!r}")
    return n - 1


def encode_at_subject(tok, texts: Sequence[str], subjects: Sequence[str]) -> tuple[list[list[int]], list[int]]:
    ids = [tok(t.format(s)).input_ids for t, s in zip(texts, subjects)]
    idx = [subject_last_index(tok, t, s) for t, s in zip(texts, subjects)]
    return ids, idx


@torch.no_grad()
def read_at_subject(lm: LoadedModel, texts: Sequence[str], subjects: Sequence[str], inputs: Sequence[str] = (),
                    outputs: Sequence[str] = (), batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Inputs of the ``inputs`` modules and outputs of the ``outputs`` modules at each text's
    subject-last token, ``{"in:name": [n, d], "out:name": [n, d]}``, each on its module's device.

    The forward stops as soon as everything is read, so layers above are never run.
    """
    ids, idx = encode_at_subject(lm.tok, texts, subjects)
    parts: dict[str, list[torch.Tensor]] = {}
    for s in range(0, len(ids), batch_size):
        b_ids, mask = pad_batch(ids[s: s + batch_size], lm.tok.pad_token_id, lm.device)
        with trace(lm.model, inputs=tuple(inputs), outputs=tuple(outputs), stop_when_done=True) as got:
            try:
                lm.model(input_ids=b_ids, attention_mask=mask, use_cache=False)
            except StopForward:
                pass
        for key, value in got.items():
            rows = torch.arange(len(b_ids), device=value.device)
            cols = torch.tensor(idx[s: s + batch_size], device=value.device)
            parts.setdefault(key, []).append(value[rows, cols])
    return {key: torch.cat(v) for key, v in parts.items()}


def io_at_subject(lm: LoadedModel, module: str, texts: Sequence[str],
                  subjects: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output of ``module`` at each text's subject-last token: ``[n, d_in], [n, d_out]``."""
    got = read_at_subject(lm, texts, subjects, inputs=(module,), outputs=(module,))
    return got["in:" + module], got["out:" + module]


def two_level_mean(values: torch.Tensor, groups: Sequence[Sequence[str]]) -> torch.Tensor:
    """The reference's average over context templates: mean within each template group, then
    across groups (so the bare prompt, alone in the first group, carries half the weight).
    ``values``: one row per template, in the order of the flattened groups."""
    means, start = [], 0
    for g in groups:
        means.append(values[start: start + len(g)].mean(0))
        start += len(g)
    return torch.stack(means).mean(0)


@dataclass
class TemplateReads:
    """One pass over every request's templated prompts: per request, the key (input of the edited
    projection) at every template, and the outputs of ``outputs`` at the bare prompt."""

    keys: list[torch.Tensor]  # per request: [n_templates, d_in], in flattened-template order
    bare: dict[str, torch.Tensor]  # output name -> [n_requests, d_out]


def read_templates(lm: LoadedModel, key_module: str, groups: Sequence[Sequence[str]],
                   requests: Sequence[EditRequest], outputs: Sequence[str] = ()) -> TemplateReads:
    flat = [t for g in groups for t in g]
    # The bare prompt is a template of its own (the first group, "{}"); add it where it is not.
    bare_at = flat.index("{}") if "{}" in flat else len(flat)
    per_req = flat if bare_at < len(flat) else flat + ["{}"]
    texts = [fill(t, r.prompt) for r in requests for t in per_req]
    subjects = [r.subject for r in requests for _ in per_req]
    got = read_at_subject(lm, texts, subjects, inputs=(key_module,), outputs=(key_module, *outputs))
    k, m = got["in:" + key_module], len(per_req)
    keys = [k[i * m: i * m + len(flat)] for i in range(len(requests))]
    bare = {name: got["out:" + name][bare_at::m] for name in (key_module, *outputs)}
    bare["in:" + key_module] = k[bare_at::m]
    return TemplateReads(keys, bare)

