"""The one request type every loader normalises into."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EditRequest:
    """One CounterFact edit: ``prompt.format(subject)`` should be completed by ``target_new``."""

    case_id: int
    subject: str
    prompt: str  # template with exactly one "{}" where the subject goes
    target_new: str  # no leading space; tokenizer-side spacing is the scorer's job
    target_true: str
    paraphrase_prompts: tuple[str, ...] = field(default_factory=tuple)
    neighborhood_prompts: tuple[str, ...] = field(default_factory=tuple)
    generation_prompts: tuple[str, ...] = field(default_factory=tuple)  # fluency rounds (original schema)
    relation_id: str | None = None

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.format(self.subject)
