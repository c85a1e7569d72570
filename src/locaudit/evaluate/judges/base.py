"""The judge interface: score (question, answer) pairs as probabilities of truthful and informative.

A judge may score only one of the two: the other is None, and results report it as missing.
`References` gives judges that use TruthfulQA's reference answers (reference, trained, api) the
correct / incorrect answers of a question, looked up by normalised question text.

Behaviours: a judge declares which behaviours its verdicts mean something for (`Judge.behaviours`):
TruthfulQA's truth/info judges (trained, hf, reference, default, api without a rubric) are valid for
``truthfulqa`` only; an API judge with a CAA rubric for ``caa:<behaviour>``; ``*`` for any behaviour.
`behaviours.check_judge(judge, behaviour_spec)` refuses a mismatch (e.g. sycophancy data scored by truth judges).
"""

from __future__ import annotations

import math
import re
import unicodedata
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from locaudit.errors import ConfigError, DataError
from locaudit.io import file_sha256, stable_hash

KINDS = ("truth", "info")
TRUTHFULQA = "truthfulqa"
ANY_BEHAVIOUR = "*"


@dataclass(frozen=True)
class JudgeScore:
    """Probability that an answer is truthful / informative; None where the judge does not score it."""

    truth: float | None
    info: float | None

    def __post_init__(self) -> None:
        for name in KINDS:
            v = getattr(self, name)
            if v is None:
                continue
            if not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
                raise ValueError(f"JudgeScore.{name}={v!r}: must be a probability in [0, 1] or None")
            object.__setattr__(self, name, float(v))


class Judge(ABC):
    """Scores answers. `name` identifies the judge in results and cache keys: two judges with the same
    name must give the same scores."""

    name: str
    kinds: tuple[str, ...] = KINDS
    behaviours: tuple[str, ...] = (TRUTHFULQA,)  # what its verdicts are valid for (see the module docstring)

    @abstractmethod
    def score(self, questions: Sequence[str], answers: Sequence[str]) -> list[JudgeScore]:
        """One JudgeScore per (question, answer) pair, in order."""

    def score_one(self, question: str, answer: str) -> JudgeScore:
        return self.score([question], [answer])[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def check_pairs(questions: Sequence[str], answers: Sequence[str]) -> None:
    if len(questions) != len(answers):
        raise ValueError(f"score: {len(questions)} questions but {len(answers)} answers")
    for i, (q, a) in enumerate(zip(questions, answers)):
        if not isinstance(q, str) or not isinstance(a, str):
            raise TypeError(f"score: pair {i} is ({type(q).__name__}, {type(a).__name__}), expected (str, str)")


def normalise_question(text: str) -> str:
    """Lower-cased alphanumeric words: how judge-data questions are matched to TruthfulQA questions
    (robust to whitespace, quotes and punctuation differences between file versions)."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    return " ".join(re.findall(r"[a-z0-9]+", text))


class References:
    """Reference answers by question: normalised question text -> (correct, incorrect).

    TruthfulQA's own BLEU/ROUGE metrics add "I have no comment." to the correct answers; so does
    `lookup(..., with_no_comment=True)`.
    """

    NO_COMMENT = "I have no comment."

    def __init__(self, table: dict[str, tuple[tuple[str, ...], tuple[str, ...]]], source: str = "in-memory") -> None:
        self.table = table
        self.source = source
        self.fingerprint = stable_hash(sorted(table.items()))

    @classmethod
    def from_questions(cls, questions: Iterable, source: str = "in-memory") -> "References":
        """From locaudit.data Question objects (anything with .question, .correct, .incorrect)."""
        table = {normalise_question(q.question): (tuple(q.correct), tuple(q.incorrect)) for q in questions}
        return cls(table, source)

    @classmethod
    def from_csv(cls, path: str | Path) -> "References":
        """From a TruthfulQA CSV (any version)."""
        from locaudit.data.truthfulqa import load_truthfulqa

        path = Path(path)
        refs = cls.from_questions(load_truthfulqa(path), source=str(path))
        refs.fingerprint = stable_hash({"csv": file_sha256(path), "table": refs.fingerprint})
        return refs

    @classmethod
    def from_spec(cls, spec: str | Path) -> "References":
        """`truthfulqa:PATH.csv` or a plain CSV path."""
        text = str(spec)
        if text.startswith("truthfulqa:"):
            text = text.split(":", 1)[1]
        if not text or not Path(text).is_file():
            raise ConfigError(f"references {spec!r}: expected truthfulqa:PATH.csv with an existing TruthfulQA CSV")
        return cls.from_csv(text)

    def __len__(self) -> int:
        return len(self.table)

    def __contains__(self, question: str) -> bool:
        return normalise_question(question) in self.table

    def lookup(self, question: str, with_no_comment: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        """(correct, incorrect) reference answers of `question`, or None if unknown."""
        hit = self.table.get(normalise_question(question))
        if hit is None:
            return None
        correct, incorrect = hit
        if with_no_comment and self.NO_COMMENT not in correct:
            correct = (*correct, self.NO_COMMENT)
        return correct, incorrect

    def require(self, question: str, with_no_comment: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
        hit = self.lookup(question, with_no_comment)
        if hit is None:
            raise DataError(f"no reference answers for question {question!r} in {self.source}")
        return hit


# ------------------------------------------------------------------------------------------ judge / behaviour
def behaviour_key(spec: str) -> str:
    """The behaviour a data spec measures: ``truthfulqa``, ``caa:<behaviour>`` (generate or test set, by name
    or path), ``pairs:<file stem>`` or the spec's kind."""
    kind, _, arg = str(spec).partition(":")
    kind = kind.strip().lower()
    if kind == "truthfulqa":
        return TRUTHFULQA
    if kind == "caa":
        p = Path(arg)
        if p.suffix == ".json":  # .../datasets/{generate,test}/<behaviour>/<file>.json
            name = p.parent.name if p.parent.name not in ("", ".") else p.stem
        else:
            name = arg.strip("/").removeprefix("test/")
        return f"caa:{name}"
    if kind == "pairs":
        return f"pairs:{Path(arg).stem}"
    return kind


