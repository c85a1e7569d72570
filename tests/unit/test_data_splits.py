"""Question-level seeded splits: disjoint, complete, reproducible, order-independent; fraction checks."""

from __future__ import annotations

import pytest

from locaudit.data import Question, split_questions
from locaudit.data.splits import split_sizes, subsample_questions
from locaudit.errors import ConfigError, DataError


def make_questions(n):
    return [Question(qid=f"q{i:03d}", question=f"Question {i}?", best_answer="a", correct=("a",), incorrect=("b",))
            for i in range(n)]


@pytest.mark.parametrize("n", [1, 5, 10, 817])
def test_disjoint_complete_and_sized(n):
    qs = make_questions(n)
    s = split_questions(qs)
    ids = [q.qid for split in ("train", "val", "test") for q in s[split]]
    assert sorted(ids) == sorted(q.qid for q in qs)  # every question exactly once
    assert len(set(ids)) == len(ids)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == split_sizes(n, (0.6, 0.2, 0.2))
    if n == 817:
        assert (len(s["train"]), len(s["val"]), len(s["test"])) == (490, 163, 164)


def test_reproducible_seeded_and_order_independent():
    qs = make_questions(50)
    a, b = split_questions(qs, seed=3), split_questions(list(reversed(qs)), seed=3)
    assert {k: [q.qid for q in v] for k, v in a.items()} == {k: [q.qid for q in v] for k, v in b.items()}
    c = split_questions(qs, seed=4)
    assert {q.qid for q in a["train"]} != {q.qid for q in c["train"]}


def test_other_fractions():
    s = split_questions(make_questions(10), fractions=(0.8, 0.2, 0.0))
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (8, 2, 0)
    s = split_questions(make_questions(10), fractions=[0.5, 0.5, 0])
    assert len(s["train"]) == 5 and len(s["val"]) == 5 and s["test"] == []


@pytest.mark.parametrize(
    "fractions, match",
    [
        ((0.6, 0.2), r"\(0\.6, 0\.2\): expected three numbers"),
        ((0.6, 0.3, 0.3), r"sum to 1\.2"),
        ((1.2, -0.1, -0.1), r"the train fraction 1\.2 is not in \[0, 1\]"),
        ((0.7, -0.1, 0.4), r"the val fraction -0\.1"),
        ((0.0, 0.5, 0.5), r"train fraction must be > 0"),
        (("a", 0.2, 0.2), r"expected three numbers"),
        ((float("nan"), 0.5, 0.5), r"the train fraction nan"),
    ],
)
def test_bad_fractions_name_the_value(fractions, match):
    with pytest.raises(ConfigError, match=match):
        split_questions(make_questions(10), fractions=fractions)


def test_duplicate_ids_rejected():
    qs = make_questions(3)
    with pytest.raises(DataError, match="'q001' appears more than once"):
        split_questions(qs + [qs[1]])


def test_subsample_is_seeded_and_keeps_order():
    qs = make_questions(100)
    a = subsample_questions(qs, 10, seed=1)
    assert len(a) == 10 and a == subsample_questions(qs, 10, seed=1)
    assert [q.qid for q in a] == sorted(q.qid for q in a)  # input order kept
    assert a != subsample_questions(qs, 10, seed=2)
    assert subsample_questions(qs, None) == qs and subsample_questions(qs, 1000) == qs
    with pytest.raises(ConfigError, match="max_questions=0"):
        subsample_questions(qs, 0)
