"""GLUE downstream tasks: the paper's few-shot prompt formats and its balanced 200-example subsets.

Prompt formats, few-shot examples, answer markers and label-word parsing follow the paper's code,
``scalable-model-editing/gradual-catastrophic-forgetting`` @ 88a07d7, ``glue_eval/{sst,mrpc,rte,
cola}_eval.py`` (= the appendix tables of Gupta et al. 2024): SST-2 four shots, MRPC six, RTE three,
CoLA six; the answer is parsed from the text after the last answer marker, label words checked in
the order the reference code checks them (substring match), anything else is unparseable.

One deliberate fix: the reference RTE code maps "False" -> label 0, but label 0 is *entailment*
(HF convention, which its own subset uses), so its shots and parser say "False" for entailed
hypotheses.  Here "True" means entailment (label 0) and the three shots carry the semantically
right answers (Babylon -> True, punitive damages -> False, obesity -> True).

The few-shot examples are the reference's fixed hand-written set; :func:`load_task` checks that no
shot sentence occurs in the evaluation subset.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from editlab.data.files import read_records
from editlab.errors import DataError


@dataclass(frozen=True)
class GlueExample:
    text: str  # the example's part of the prompt, ending with the answer marker
    label: int
    idx: int


@dataclass(frozen=True)
class GlueTask:
    name: str
    fields: tuple[str, ...]  # record fields the prompt uses
    prefix: str  # the few-shot context shared by every example
    template: Callable[[dict], str]  # record -> example prompt (ends with the answer marker)
    marker: str  # answer marker: the answer is parsed from the text after its last occurrence
    words: tuple[tuple[str, int], ...]  # (label word, label) in the order the parser checks them
    shots: tuple[str, ...] = ()  # shot sentences, for the overlap check

    def parse(self, generated: str) -> int:
        """Label from generated text; -1 when no label word occurs (counted as wrong)."""
        answer = generated.split(self.marker)[-1].strip()
        for word, label in self.words:
            if word in answer:
                return label
        return -1

    @property
    def labels(self) -> list[int]:
        return sorted({label for _, label in self.words})

    def examples(self, records: list[dict]) -> list[GlueExample]:
        return [GlueExample(self.template(r), int(r["label"]), int(r["idx"])) for r in records]


def _shots(marker: str, items: list[tuple[str, str]], head: str = "") -> str:
    return "".join(f"{head}{body}\n{marker} {ans}\n\n" for body, ans in items)


_SST_SHOTS = [("excruciatingly unfunny and pitifully unromantic", "negative"),
              ("rich veins of funny stuff in this movie", "positive"),
              ("by far the worst movie of the year", "negative"),
              ("fashioning an engrossing entertainment out", "positive")]

_MRPC_SHOTS = [
    ("Mr McDevitt has been granted control of three crucial aspects of policing in the Solomons.",
     "Mr McDevitt has been granted control of three aspects of policing by Commissioner William Morrell.", "No"),
    ("They had published an advertisement on the Internet on June 10, offering the cargo for sale, he added.",
     "On June 10, the ship's owners had published an advertisement on the Internet, offering the explosives for sale.",
     "Yes"),
    ("In 2002, Linksys overtook Cisco Systems as the leading wireless equipment vendor, accounting for 14.1 percent "
     "of revenue.", "Rolfe said Linksys overtook Cisco Systems last year as the leading supplier of WLAN equipment.",
     "No"),
    ("The notification was first reported Friday by MSNBC.", "MSNBC.com first reported the CIA request on Friday.",
     "Yes"),
    ('"The anticipated global sales improvement in the month of June did not materialize", said Chief Financial '
     "Officer Robert Rivet.", '"The anticipated global sales improvement in the month of June did not materialize '
     'as we had anticipated", the company said.', "Yes"),
    ("That compared with $ 35.18 million, or 24 cents per share, in the year-ago period.",
     "Earnings were affected by a non-recurring $8 million tax benefit in the year-ago period.", "No"),
]

_RTE_SHOTS = [
    ("Cyrus captured Babylon without a battle, and remedied the evils done by previous Assyrian and Babylonian "
     "rulers by sending prisoners in Babylonia back to their original homelands and aiding in the restoration of "
     "temples of the gods of various nations.", "Babylon surrendered to Cyrus without going to battle.", "True"),
    ("Successful plaintiffs recovered punitive damages in Texas discrimination cases 53% of the time.",
     "Legal costs to recover punitive damages are a deductible business expense.", "False"),
    ("The gastric bypass operation, also known as stomach stapling, has become the most common surgical "
     "procedure for treating obesity.", "Obesity is medically treated.", "True"),
]

_COLA_SHOTS = [("Bill pushed Harry off the sofa for hours.", "No"), ("Bill floated down the river for hours.", "Yes"),
               ("It is important for the more you eat, the more careful you to be.", "No"),
               ("It is important for you to be more careful, the more you eat.", "Yes"),
               ("Mary will believe Susan, and you will Bob.", "Yes"), ("You will Bob believe.", "No")]

_MRPC_HEAD = "Are the sentences paraphrases of each other.\n"
_COLA_HEAD = "Is this sentence linguistically acceptable?\n"

TASKS: dict[str, GlueTask] = {
    "sst2": GlueTask(
        "sst2", ("sentence",),
        _shots("Sentiment :", [(f"Review : {s}", a) for s, a in _SST_SHOTS]),
        lambda r: f"Review : {r['sentence']}\nSentiment :", "Sentiment :",
        (("positive", 1), ("negative", 0)), tuple(s for s, _ in _SST_SHOTS)),
    "mrpc": GlueTask(
        "mrpc", ("sentence1", "sentence2"),
        _shots("Answer:", [(f"Sentence 1: {a}\nSentence 2: {b}", y) for a, b, y in _MRPC_SHOTS], _MRPC_HEAD),
        lambda r: f"{_MRPC_HEAD}Sentence 1: {r['sentence1']}\nSentence 2: {r['sentence2']}\nAnswer:", "Answer:",
        (("Yes", 1), ("No", 0)), tuple(s for a, b, _ in _MRPC_SHOTS for s in (a, b))),
    "rte": GlueTask(
        "rte", ("sentence1", "sentence2"),
        _shots("answer:", [(f"{p}\nquestion: {h} True or False?", y) for p, h, y in _RTE_SHOTS]),
        lambda r: f"{r['sentence1']}\nquestion: {r['sentence2']} True or False?\nanswer:", "answer:",
        (("False", 1), ("True", 0)), tuple(s for p, h, _ in _RTE_SHOTS for s in (p, h))),
    "cola": GlueTask(
        "cola", ("sentence",),
        _shots("Answer :", [(f"Sentence : {s}", a) for s, a in _COLA_SHOTS], _COLA_HEAD),
        lambda r: f"{_COLA_HEAD}Sentence : {r['sentence']}\nAnswer :", "Answer :",
        (("Yes", 1), ("No", 0)), tuple(s for s, _ in _COLA_SHOTS)),
}


def load_task(glue_dir: Path, name: str, n: int | None = None) -> tuple[GlueTask, list[GlueExample]]:
    """A task and the first ``n`` examples of its balanced subset ``<glue_dir>/<name>.json``."""
    if name not in TASKS:
        raise ValueError(f"eval.downstream_tasks: unknown task {name!r}; known: {sorted(TASKS)}")
    task = TASKS[name]
    path = Path(glue_dir) / f"{name}.json"
    records = read_records(path, f"GLUE subset {path} not found (data.glue / EDITLAB_DATA)", nonempty=False)
    records = records if n is None else records[:n]
    for i, r in enumerate(records):
        for f in (*task.fields, "label", "idx"):
            if not isinstance(r, dict) or f not in r:
                raise DataError(f"{path}: record {i} has no field {f!r}")
        if r["label"] not in task.labels:
            raise DataError(f"{path}: record {i} (idx {r['idx']}) has label {r['label']!r}, not in {task.labels}")
        for f in task.fields:
            if not isinstance(r[f], str):
                raise DataError(f"{path}: record {i} (idx {r['idx']}) field {f!r} is not a string")
            clash = [s for s in task.shots if s.strip() == r[f].strip()]
            if clash:
                raise DataError(f"{path}: record {i} (idx {r['idx']}) is a few-shot example: {clash[0]!r}")
    return task, task.examples(records)
