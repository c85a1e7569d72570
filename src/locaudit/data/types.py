"""Value types of behaviour data: questions, preference pairs, probe examples, MC items."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

SPLITS = ("train", "val", "test")


def normalise_text(text: str) -> str:
    """Whitespace-collapsed, stripped text: the form question ids are computed from."""
    return " ".join(str(text).split())


def question_id(text: str, prefix: str = "tqa") -> str:
    """A stable id from the question text, e.g. 'tqa-1a2b3c4d5e'.

    Derived from the whitespace-normalised text, so the v1 CSV, the Jan-2025 CSV, the hub copy and
    mc_task.json give the same id to the same question, independent of row order.
    """
    digest = hashlib.sha1(normalise_text(text).encode("utf-8")).hexdigest()[:10]
    return f"{prefix}-{digest}"


@dataclass(frozen=True)
class Question:
    """One TruthfulQA-style question with its reference answers."""

    qid: str
    question: str
    best_answer: str
    correct: tuple[str, ...]
    incorrect: tuple[str, ...]
    category: str = ""
    best_incorrect: str = ""


@dataclass(frozen=True)
class PreferencePair:
    """A question with a preferred (chosen) and a dispreferred (rejected) answer.

    `question` is the raw question text; the prompt string is built by a PromptFormat at use time,
    so one dataset serves plain and chat formats.
    """

    qid: str
    question: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class ProbeExample:
    """ITI's probing example: question, answer, then another random question appended; label 1 = correct."""

    qid: str
    question: str
    answer: str
    label: int
    random_question: str = ""
    split: str = "train"


@dataclass(frozen=True)
class MCItem:
    """A multiple-choice item: mc1 has exactly one correct answer, mc2 one or more."""

    qid: str
    question: str
    mc1_answers: tuple[str, ...]
    mc1_labels: tuple[int, ...]
    mc2_answers: tuple[str, ...]
    mc2_labels: tuple[int, ...]
    mc0_answers: tuple[str, ...] = field(default=())  # Jan-2025 binary choice: (best, best incorrect)
    mc0_labels: tuple[int, ...] = field(default=())
