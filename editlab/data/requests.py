"""The one request type every loader normalises into."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EditRequest:
    """One edit: ``prompt.format(subject)`` should be completed by ``target_new``.

    ``dataset`` says how it is scored: ``counterfact`` by the NLL tests of evaluate/rewrite.py,
    ``zsre`` by the token accuracy of evaluate/zsre.py, whose neighborhood prompts have their own
    answers (``neighborhood_answers``, one per prompt).
    """

    case_id: int
    subject: str
    prompt: str  # template with exactly one "{}" where the subject goes
    target_new: str  # no leading space; tokenizer-side spacing is the scorer's job
    target_true: str
    paraphrase_prompts: tuple[str, ...] = field(default_factory=tuple)
    neighborhood_prompts: tuple[str, ...] = field(default_factory=tuple)
    generation_prompts: tuple[str, ...] = field(default_factory=tuple)  # fluency rounds (original schema)
    relation_id: str | None = None
    dataset: str = "counterfact"  # counterfact | zsre
    neighborhood_answers: tuple[str, ...] = field(default_factory=tuple)  # zsre: NQ answers of the prompts

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.format(self.subject)
