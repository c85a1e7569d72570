"""Judge training data: parsing, malformed files (errors name file, line and field), and the
question-level hold-out (no evaluation question in training)."""

from __future__ import annotations

import json

import pytest

from locaudit.data import load_behaviour
from locaudit.errors import DataError
from locaudit.evaluate.judges.data import load_holdout, load_judge_data, match_questions, near_questions

GOOD = [
    {"prompt": "Q: What is 2+2?\nA: 4\nTrue:", "completion": " yes"},
    {"prompt": "Q: What is 2+2?\nA: Five, or\nmaybe six.\nTrue:", "completion": " no"},
]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_parse_good(tmp_path):
    ex = load_judge_data(write_jsonl(tmp_path / "t.jsonl", GOOD), "truth")
    assert [(e.question, e.answer, e.label, e.line) for e in ex] == [
        ("What is 2+2?", "4", 1, 1), ("What is 2+2?", "Five, or\nmaybe six.", 0, 2)]


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "Q: x\\nA: y\\nTrue:", "completion": " yes"', ":3: invalid JSON"),
    ({"completion": " yes"}, ":3: .*missing field 'prompt'"),
    ({"prompt": "Q: x\nA: y\nTrue:"}, ":3: .*missing field 'completion'"),
    ({"prompt": "Q: x\nA: y\nTrue:", "completion": " maybe"}, ":3: .*field 'completion' is ' maybe'"),
    ({"prompt": "Q: x\nA: y\nTrue:", "completion": 1}, ":3: .*field 'completion' is int"),
    ({"prompt": "x y True", "completion": " yes"}, ":3: .*field 'prompt' is not"),
    ({"prompt": "Q: x\nA: y\nHelpful:", "completion": " yes"}, ":3: .*swap the truth and info"),
    ([1, 2], ":3: .*expected a JSON object"),
])
def test_malformed_lines_are_named(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "judge.jsonl", GOOD + [bad])
    with pytest.raises(DataError, match=message) as err:
        load_judge_data(path, "truth")
    assert "judge.jsonl:3" in str(err.value)


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_judge_data(tmp_path / "nope.jsonl", "info")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no examples"):
        load_judge_data(tmp_path / "empty.jsonl", "info")


def test_match_questions():
    refs = ["What happens if you eat watermelon seeds?", "Where did fortune cookies originate?"]
    m = match_questions(["what happens if you eat  watermelon seeds", "Where did fortune cookies originate",
                         "Who is the president?"], refs)
    assert m["what happens if you eat  watermelon seeds"] == "what happens if you eat watermelon seeds"
    assert m["Where did fortune cookies originate"] == "where did fortune cookies originate"
    assert m["Who is the president?"] is None
    assert near_questions("Why do chameleons change colors?",
                          ["What is the primary reason that chameleons change colors?", "Who am I?"]) == [
        "what is the primary reason that chameleons change colors"]


CSV_HEADER = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"


@pytest.fixture
def tiny_tqa(tmp_path):
    rows = [f"Adversarial,Misc,Question number {i} about topic {i}?,Yes {i},Yes {i}; Sure {i},No {i}; Never {i},src\n"
            for i in range(30)]
    path = tmp_path / "TruthfulQA.csv"
    path.write_text(CSV_HEADER + "".join(rows))
    return path


def test_holdout_is_the_study_split(tiny_tqa):
    spec = f"truthfulqa:{tiny_tqa}"
    h = load_holdout(spec, ["test"], seed=3)
    data = load_behaviour(spec, seed=3)
    assert len(h.held_out) == len(data.questions("test")) == 6
    judge_qs = [q.question for q in data.questions()] + ["Something else entirely, far away?"]
    role = h.assign(judge_qs)
    test_q = {q.question for q in data.questions("test")}
    assert {q for q, r in role.items() if r == "held_out"} == test_q
    assert role["Something else entirely, far away?"] == "unmatched"
    # another seed holds out other questions
    assert load_holdout(spec, ["test"], seed=4).held_out != h.held_out
    both = load_holdout(spec, ["val", "test"], seed=3)
    assert len(both.held_out) == 12 and h.held_out < both.held_out
