"""Context templates: short model-generated prefixes put before a prompt when averaging keys.

Generated from the unedited model with a seeded ``torch.Generator`` (top-k sampling), so the
same model + seed always gives the same templates; they are saved in the editor's state.
"""
from __future__ import annotations

import torch

from editlab.evaluate.scoring import input_device

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def generate_templates(model, tok, length_params, seed: int, top_k: int = 5) -> list[list[str]]:
    """``[["{}"], [group for (length, count)]...]``: one group per ``[length, count]`` pair.

    Each sample starts from a seed word (cycled) and runs to ``length`` tokens in all; braces are
    stripped so the result can be ``.format``-ed, and ". {}" is appended (as the reference).
    """
    gen = torch.Generator().manual_seed(seed)
    device = input_device(model)
    groups: list[list[str]] = [["{}"]]
    for length, count in length_params:
        group = []
        for i in range(count):
            ids = tok(SEED_WORDS[i % len(SEED_WORDS)], return_tensors="pt").input_ids.to(device)
            while ids.shape[1] < length:
                logits = model(input_ids=ids, use_cache=False).logits[0, -1].float()
                top = torch.topk(logits, top_k)
                probs = torch.softmax(top.values, -1).cpu()
                nxt = top.indices[torch.multinomial(probs, 1, generator=gen).item()]
                ids = torch.cat([ids, nxt.view(1, 1).to(device)], dim=1)  # logits may sit elsewhere
            text = tok.decode(ids[0], skip_special_tokens=True)
            group.append(text.replace("{", " ").replace("}", " ") + ". {}")
        groups.append(group)
    return groups
