"""Preference pairs: every (correct, incorrect) combination; generic JSONL/JSON/CSV loader and its errors."""

from __future__ import annotations

import json

import pytest

from locaudit.data import Question, load_pairs, preference_pairs, question_id
from locaudit.errors import DataError


def test_every_combination_and_self_pairs_skipped():
    q1 = Question("a", "Q1?", "c1", ("c1", "c2"), ("i1", "i2", "i3"))
    q2 = Question("b", "Q2?", "c", ("c", "Unknown"), ("Unknown", "i"))
    pairs = preference_pairs([q1, q2])
    assert len(pairs) == 2 * 3 + (2 * 2 - 1)
    assert [(p.chosen, p.rejected) for p in pairs[:6]] == [(c, r) for c in ("c1", "c2") for r in ("i1", "i2", "i3")]
    assert ("Unknown", "Unknown") not in [(p.chosen, p.rejected) for p in pairs]
    assert all(p.qid == "a" and p.question == "Q1?" for p in pairs[:6])
    assert {p.chosen for p in pairs} <= {"c1", "c2", "c", "Unknown"}
    assert preference_pairs([]) == []


ROWS = [
    {"prompt": "Is the sky blue?", "chosen": "Yes", "rejected": "No"},
    {"prompt": "Is the sky blue?", "chosen": "Usually", "rejected": "Never"},
    {"prompt": "2+2?", "chosen": "4", "rejected": "5", "qid": "math-1"},
]


def test_jsonl_json_and_csv_agree(tmp_path):
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    (tmp_path / "p.json").write_text(json.dumps(ROWS))
    (tmp_path / "p.csv").write_text(
        "\ufeffprompt,chosen,rejected,qid\n" + "".join(f'"{r["prompt"]}",{r["chosen"]},{r["rejected"]},{r.get("qid", "")}\n' for r in ROWS),
        encoding="utf-8",
    )
    loaded = [load_pairs(tmp_path / f"p.{ext}") for ext in ("jsonl", "json", "csv")]
    assert loaded[0] == loaded[1] == loaded[2]
    p = loaded[0]
    assert p[0].qid == p[1].qid == question_id("Is the sky blue?", prefix="pair")  # same prompt, same id
    assert p[2].qid == "math-1" and (p[2].question, p[2].chosen, p[2].rejected) == ("2+2?", "4", "5")


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("p.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"\n', r"p\.jsonl:2: invalid JSON"),
        ("p.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "a", "rejected": "c"}\n', r"p\.jsonl:3: missing field 'chosen'"),
        ("p.jsonl", '{"prompt": "a", "chosen": "", "rejected": "c"}\n', r"p\.jsonl:1: field 'chosen' must be a non-empty string"),
        ("p.jsonl", '{"prompt": 3, "chosen": "b", "rejected": "c"}\n', r"p\.jsonl:1: field 'prompt' must be a non-empty string, got 3"),
        ("p.jsonl", '["a", "b", "c"]\n', r"p\.jsonl:1: expected an object"),
        ("p.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c", "qid": [1]}\n', r"p\.jsonl:1: field 'qid'"),
        ("p.json", '{"prompt": "a"}', r"p\.json: expected a JSON list"),
        ("p.json", '[{"prompt": "a", "chosen": "b"}]', r"p\.json: item 0: missing field 'rejected'"),
        ("p.csv", "prompt,chosen\na,b\n", r"p\.csv: missing column\(s\) \['rejected'\]"),
        ("p.csv", "prompt,chosen,rejected\na,b,c\na,,c\n", r"p\.csv:3: field 'chosen'"),
        ("p.csv", "prompt,chosen,rejected\na,b,c,d\n", r"p\.csv:2: more fields than columns"),
        ("p.txt", "x", r"p\.txt: unknown pairs format '\.txt'"),
        ("p.jsonl", "\n\n", r"p\.jsonl: no pairs"),
    ],
)
def test_malformed_pairs_name_file_line_field(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=match):
        load_pairs(tmp_path / name)


def test_missing_pairs_file(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        load_pairs(tmp_path / "missing.jsonl")
