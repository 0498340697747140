"""CounterFact in the original ROME schema and in the reduced flat (EasyEdit) schema."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from editlab.data.files import read_records
from editlab.data.requests import EditRequest
from editlab.errors import DataError

log = logging.getLogger(__name__)


def _text(rec: dict, path: tuple[str, ...], file: Path, case_id: Any) -> str:
    node: Any = rec
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise DataError(f"{file}: case_id {case_id}: missing field {'.'.join(path)!r}")
        node = node[key]
    if not isinstance(node, str) or not node.strip():
        raise DataError(f"{file}: case_id {case_id}: field {'.'.join(path)!r} must be a non-empty string, got {node!r}")
    return node.replace("\u00a0", " ")  # CounterFact has stray non-breaking spaces


def _texts(rec: dict, key: str, file: Path, case_id: Any) -> tuple[str, ...]:
    value = rec.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise DataError(f"{file}: case_id {case_id}: field {key!r} must be a list of non-empty strings")
    return tuple(v.replace("\u00a0", " ") for v in value)


def _case_id(rec: Any, file: Path, position: int) -> int:
    if not isinstance(rec, dict):
        raise DataError(f"{file}: record #{position} is not a JSON object")
    cid = rec.get("case_id")
    if not isinstance(cid, int) or isinstance(cid, bool):
        raise DataError(f"{file}: record #{position}: field 'case_id' must be an integer, got {cid!r}")
    return cid


def _template(prompt: str, subject: str, file: Path, case_id: int, field_name: str) -> str:
    if prompt.count("{}") == 1:
        return prompt
    if "{}" in prompt:
        raise DataError(f"{file}: case_id {case_id}: field {field_name!r} has more than one '{{}}'")
    if subject not in prompt:
        raise DataError(f"{file}: case_id {case_id}: subject {subject!r} does not occur in field {field_name!r}: {prompt!r}")
    head, _, tail = prompt.rpartition(subject)  # the last mention is the one being completed
    return head.replace("{", "{{").replace("}", "}}") + "{}" + tail.replace("{", "{{").replace("}", "}}")


def parse_original(rec: dict, file: Path, position: int) -> EditRequest:
    cid = _case_id(rec, file, position)
    rr = ("requested_rewrite",)
    subject = _text(rec, rr + ("subject",), file, cid)
    prompt = _text(rec, rr + ("prompt",), file, cid)
    return EditRequest(
        case_id=cid,
        subject=subject,
        prompt=_template(prompt, subject, file, cid, "requested_rewrite.prompt"),
        target_new=_text(rec, rr + ("target_new", "str"), file, cid).strip(),
        target_true=_text(rec, rr + ("target_true", "str"), file, cid).strip(),
        paraphrase_prompts=_texts(rec, "paraphrase_prompts", file, cid),
        neighborhood_prompts=_texts(rec, "neighborhood_prompts", file, cid),
        generation_prompts=_texts(rec, "generation_prompts", file, cid),
        relation_id=rec["requested_rewrite"].get("relation_id"),
    )


def parse_flat(rec: dict, file: Path, position: int) -> EditRequest:
    cid = _case_id(rec, file, position)
    subject = _text(rec, ("subject",), file, cid)
    prompt = _text(rec, ("prompt",), file, cid)
    rephrase = rec.get("rephrase_prompt")
    locality = rec.get("locality_prompt")
    # NS scores the neighborhood prompt against target_true; a different answer has no place here.
    if locality is not None and rec.get("locality_ground_truth", rec.get("ground_truth")) != rec.get("ground_truth"):
        raise DataError(f"{file}: case_id {cid}: field 'locality_ground_truth' differs from 'ground_truth'")
    return EditRequest(
        case_id=cid,
        subject=subject,
        prompt=_template(prompt, subject, file, cid, "prompt"),
        target_new=_text(rec, ("target_new",), file, cid).strip(),
        target_true=_text(rec, ("ground_truth",), file, cid).strip(),
        paraphrase_prompts=(_text(rec, ("rephrase_prompt",), file, cid),) if rephrase is not None else (),
        neighborhood_prompts=(_text(rec, ("locality_prompt",), file, cid),) if locality is not None else (),
    )


def load_counterfact(file: str | Path) -> dict[int, EditRequest]:
    """All records of a CounterFact file keyed by case_id; the schema is detected per file."""
    file = Path(file)
    records = read_records(file, f"CounterFact file {file} does not exist (set EDITLAB_DATA or data.root)")
    first = records[0]
    parse = parse_original if isinstance(first, dict) and "requested_rewrite" in first else parse_flat
    out: dict[int, EditRequest] = {}
    for i, rec in enumerate(records):
        req = parse(rec, file, i)
        if req.case_id in out:
            raise DataError(f"{file}: case_id {req.case_id} appears twice")
        out[req.case_id] = req
    log.info("loaded %d CounterFact records (%s schema) from %s", len(out), parse.__name__[6:], file)
    return out
