"""Preference pairs: every (correct, incorrect) answer combination of a question, or pairs from a file.

The paper trains on every (correct, incorrect) combination of each training question. A combination
whose two answers are the same text (v1 lists "Unknown" as both correct and incorrect for two
questions) is skipped: it carries no preference.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from locaudit.data.types import PreferencePair, Question, question_id
from locaudit.errors import DataError
from locaudit.io import read_jsonl, csv_records

PAIR_FIELDS = ("prompt", "chosen", "rejected")


def preference_pairs(questions: Iterable[Question]) -> list[PreferencePair]:
    """Every (correct, incorrect) combination, question by question, in answer order."""
    return [
        PreferencePair(qid=q.qid, question=q.question, chosen=c, rejected=r)
        for q in questions
        for c in q.correct
        for r in q.incorrect
        if c != r
    ]


def load_pairs(path: str | Path) -> list[PreferencePair]:
    """Pairs from a JSONL (or JSON list) or CSV file with fields prompt, chosen, rejected (optional qid).

    Without a qid, pairs that share a prompt share the id 'pair-<hash of prompt>', so question-level
    splits keep them together.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e
    if suffix == ".jsonl":
        records = read_jsonl(path)
    elif suffix == ".json":
        records = _json_records(path, text)
    elif suffix == ".csv":
        records = _csv_records(path, text)
    else:
        raise DataError(f"{path}: unknown pairs format {suffix!r}; use .jsonl, .json or .csv with fields {PAIR_FIELDS}")
    pairs = [pair_from_record(path, line, rec) for line, rec in records]
    if not pairs:
        raise DataError(f"{path}: no pairs")
    return pairs


def load_pairs_hub(spec: str) -> list[PreferencePair]:
    """Pairs from a HuggingFace datasets-hub id, `OWNER/NAME[@CONFIG][:SPLIT]` (split default train), whose
    rows have the fields prompt, chosen, rejected (optional qid), as a local file's. Needs `datasets` and the
    hub (or its local cache; HF_HUB_OFFLINE=1 reads only the cache)."""
    from locaudit.data.truthfulqa import import_datasets

    name, _, split = spec.partition(":")
    name, _, config = name.partition("@")
    if not name.strip() or name.count("/") != 1:
        raise DataError(f"pairs:hf:{spec}: expected a hub id OWNER/NAME[@CONFIG][:SPLIT], e.g. "
                        "pairs:hf:OWNER/NAME:test (string columns prompt, chosen, rejected)")
    datasets = import_datasets()
    try:
        rows = datasets.load_dataset(name.strip(), config.strip() or None, split=split.strip() or "train")
    except Exception as e:  # offline, no cache, unknown id or split
        raise DataError(f"could not load {name!r} (config {config or 'default'}, split {split or 'train'}) from "
                        f"the HuggingFace hub ({type(e).__name__}: {e}); offline, pass a local file instead "
                        "(pairs:PATH.jsonl with fields prompt, chosen, rejected)") from e
    missing = [f for f in PAIR_FIELDS if f not in (rows.column_names or [])]
    if missing:
        raise DataError(f"hub dataset {name!r} (split {split or 'train'}): no column(s) {missing}; its columns are "
                        f"{rows.column_names}: write the pairs to a JSONL file with fields {PAIR_FIELDS}")
    where = Path(f"hf:{name}")
    pairs = [pair_from_record(where, f"row {i}", dict(rec)) for i, rec in enumerate(rows)]
    if not pairs:
        raise DataError(f"hub dataset {name!r} (split {split or 'train'}): no pairs")
    return pairs


def _json_records(path: Path, text: str):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of pair objects, got {type(data).__name__}")
    return [(f"item {i}", rec) for i, rec in enumerate(data)]


def _csv_records(path: Path, text: str):
    yield from csv_records(path, PAIR_FIELDS, text=text)


def pair_from_record(path: Path, line, rec) -> PreferencePair:
    where = f"{path}:{line}" if isinstance(line, int) else f"{path}: {line}"
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object with fields {PAIR_FIELDS}, got {type(rec).__name__}")
    values = {}
    for f in PAIR_FIELDS:
        v = rec.get(f)
        if v is None:
            raise DataError(f"{where}: missing field {f!r}")
        if not isinstance(v, str) or not v.strip():
            raise DataError(f"{where}: field {f!r} must be a non-empty string, got {v!r}")
        values[f] = v.strip()
    if values["chosen"] == values["rejected"]:
        raise DataError(f"{where}: chosen and rejected are the same text {values['chosen'][:60]!r}: "
                        "such a pair carries no preference")
    qid = rec.get("qid")
    if isinstance(qid, str) and not qid.strip():
        qid = None  # an empty CSV cell: no id given
    if qid is not None and (not isinstance(qid, (str, int)) or isinstance(qid, bool)):
        raise DataError(f"{where}: field 'qid' must be a string, got {qid!r}")
    return PreferencePair(
        qid=str(qid).strip() if qid is not None else question_id(values["prompt"], prefix="pair"),
        question=values["prompt"],
        chosen=values["chosen"],
        rejected=values["rejected"],
    )
