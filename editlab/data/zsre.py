"""zsRE question-answer edits (MEND's ``zsre_mend_eval`` schema, as EasyEdit and ROME read it).

A record asks a question about a subject (``src``) and is edited to a new answer (``alt``); the
rephrased question (``rephrase``) is the paraphrase and an unrelated Natural Questions question
(``loc``, "nq question: ...") with its answer (``loc_ans``) is the neighbourhood.  Records are
normalised into ``EditRequest`` with ``dataset="zsre"``, which the evaluator scores by token
accuracy (editlab/evaluate/zsre.py), never by CounterFact's NLL tests.  The record's position in
the file is its ``case_id``.

Stream order (docs/data.md): the paper's CounterFact orders do not apply, so ``sample.index=k``
(k >= 1) is a permutation of the file seeded by k alone, and ``sample.index=0`` is the file order.
Unlike CounterFact streams a subject may come back: zsRE asks several questions of one subject
(743 subjects in the 1,037 records), and the reference evaluations edit them all.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

from editlab.data.files import read_records
from editlab.data.requests import EditRequest
from editlab.errors import DataError

log = logging.getLogger(__name__)


def _text(rec: dict, key: str, file: Path, i: int) -> str:
    value = rec.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{file}: record {i}: field {key!r} must be a non-empty string, got {value!r}")
    return value.replace("\u00a0", " ").strip()


def _template(question: str, subject: str, file: Path, i: int) -> str:
    """``src`` with its last mention of the subject replaced by "{}" (braces of the rest escaped)."""
    if subject not in question:
        raise DataError(f"{file}: record {i}: subject {subject!r} does not occur in field 'src': {question!r}")
    head, _, tail = question.rpartition(subject)
    return head.replace("{", "{{").replace("}", "}}") + "{}" + tail.replace("{", "{{").replace("}", "}}")


def parse_zsre(rec: Any, file: Path, i: int) -> EditRequest:
    if not isinstance(rec, dict):
        raise DataError(f"{file}: record {i} is not a JSON object")
    subject = _text(rec, "subject", file, i)
    answers = rec.get("answers")
    if not isinstance(answers, list) or not answers:
        raise DataError(f"{file}: record {i}: field 'answers' must be a non-empty list of strings, got {answers!r}")
    if not isinstance(answers[0], str) or not answers[0].strip():
        raise DataError(f"{file}: record {i}: field 'answers' must start with a non-empty string, got {answers!r}")
    return EditRequest(
        case_id=i,
        subject=subject,
        prompt=_template(_text(rec, "src", file, i), subject, file, i),
        target_new=_text(rec, "alt", file, i),
        target_true=answers[0].strip(),
        paraphrase_prompts=(_text(rec, "rephrase", file, i),),
        neighborhood_prompts=(_text(rec, "loc", file, i),),
        neighborhood_answers=(_text(rec, "loc_ans", file, i),),
        dataset="zsre",
    )


def load_zsre(file: str | Path) -> list[EditRequest]:
    """Every record of a zsRE file in file order; a malformed one fails naming file, record, field."""
    file = Path(file)
    records = read_records(file, f"zsRE file {file} does not exist (set EDITLAB_DATA or data.root)")
    out = [parse_zsre(rec, file, i) for i, rec in enumerate(records)]
    log.info("loaded %d zsRE records from %s", len(out), file)
    return out


def zsre_order(n_records: int, index: int) -> list[int]:
    """Record positions in stream order: the file order for ``index`` 0, else a permutation
    seeded by ``index`` alone (Python's ``random.Random(index).shuffle``, stable across versions)."""
    if index < 0:
        raise DataError(f"sample.index={index}: a zsRE order is 0 (file order) or a seed >= 1")
    order = list(range(n_records))
    if index > 0:
        random.Random(index).shuffle(order)
    return order


def select_zsre(records: list[EditRequest], index: int, n_edits: int) -> list[EditRequest]:
    """The first ``n_edits`` records of order ``index``."""
    if n_edits > len(records):
        raise DataError(f"only {len(records)} zsRE records are available, n_edits={n_edits}")
    return [records[i] for i in zsre_order(len(records), index)[:n_edits]]
