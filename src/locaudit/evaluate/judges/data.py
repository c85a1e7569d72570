"""TruthfulQA's judge training data (finetune_truth.jsonl / finetune_info.jsonl) and the question-level
hold-out that keeps every evaluation question out of judge training.

Each line: {"prompt": "Q: {question}\\nA: {answer}\\nTrue:", "completion": " yes" | " no"}
("Helpful:" for info). Judge-data questions are matched to TruthfulQA questions by normalised text
(base.normalise_question); a judge-data question that matches no question exactly is matched to the
most similar one when they are near-identical (reworded between file versions), so that a reworded
evaluation question is held out too.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from locaudit.errors import ConfigError, DataError
from locaudit.evaluate.judges.base import normalise_question
from locaudit.evaluate.judges.hf import SUFFIX
from locaudit.io import read_jsonl

_PROMPT = re.compile(r"\AQ: (?P<q>.*?)\nA: (?P<a>.*)\n(?P<suffix>True|Helpful):\Z", re.DOTALL)
LABELS = {" yes": 1, " no": 0}
FUZZY_RATIO = 0.9
NEAR_RATIO = 0.75
NEAR_OVERLAP = 0.6
_STOP = frozenset("a an the of to in on at for is are was were be do does did what whats s which who why how when "
                  "where that this it you your i we they can could would should will if and or with about from by "
                  "only there their".split())


@dataclass(frozen=True)
class JudgeExample:
    """One labelled judgement: label 1 = truthful (truth) or informative (info)."""

    question: str
    answer: str
    label: int
    line: int


def load_judge_data(path: str | Path, kind: str) -> list[JudgeExample]:
    """Parse a finetune_{truth,info}.jsonl file; errors name the file, line and field."""
    if kind not in SUFFIX:
        raise ConfigError(f"judge data kind {kind!r} is not one of {tuple(SUFFIX)}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: judge data file not found")
    want = SUFFIX[kind][:-1]
    out: list[JudgeExample] = []
    for n, rec in read_jsonl(path):
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{n}: expected a JSON object with 'prompt' and 'completion', got {type(rec).__name__}")
        for fld in ("prompt", "completion"):
            if fld not in rec:
                raise DataError(f"{path}:{n}: missing field {fld!r}")
            if not isinstance(rec[fld], str):
                raise DataError(f"{path}:{n}: field {fld!r} is {type(rec[fld]).__name__}, expected a string")
        comp = rec["completion"]
        if comp not in LABELS and comp.strip().lower() not in ("yes", "no"):
            raise DataError(f"{path}:{n}: field 'completion' is {comp!r}, expected ' yes' or ' no'")
        label = LABELS.get(comp, 1 if comp.strip().lower() == "yes" else 0)
        m = _PROMPT.match(rec["prompt"])
        if m is None:
            raise DataError(f"{path}:{n}: field 'prompt' is not 'Q: ...\\nA: ...\\n{SUFFIX[kind]}': "
                            f"{rec['prompt'][:120]!r}")
        if m.group("suffix") != want:
            raise DataError(f"{path}:{n}: field 'prompt' ends with {m.group('suffix')!r}: but this is {kind} "
                            f"data (expected {SUFFIX[kind]!r}); did you swap the truth and info files?")
        out.append(JudgeExample(m.group("q").strip(), m.group("a").strip(), label, n))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def match_questions(judge_questions: Sequence[str], reference_questions: Sequence[str],
                    fuzzy_ratio: float = FUZZY_RATIO) -> dict[str, str | None]:
    """Map each judge-data question to the normalised text of the reference question it is (None if none).

    Exact match on normalised text first; otherwise the most similar reference question if
    difflib's ratio >= `fuzzy_ratio` (catches questions reworded between TruthfulQA versions).
    """
    refs = {normalise_question(q) for q in reference_questions}
    ref_list = sorted(refs)
    out: dict[str, str | None] = {}
    for q in dict.fromkeys(judge_questions):
        nq = normalise_question(q)
        if nq in refs:
            out[q] = nq
            continue
        best = difflib.get_close_matches(nq, ref_list, n=1, cutoff=fuzzy_ratio)
        out[q] = best[0] if best else None
    return out


def _content_words(nq: str) -> set[str]:
    return {w for w in nq.split() if w not in _STOP}


def near_questions(question: str, reference_questions: Sequence[str]) -> list[str]:
    """Normalised reference questions that may be a rewording of `question` (a deliberately loose test:
    difflib ratio >= NEAR_RATIO or content-word overlap coefficient >= NEAR_OVERLAP). Used to hold out,
    conservatively, an unmatched judge-data question that resembles an evaluation question."""
    nq = normalise_question(question)
    words = _content_words(nq)
    out = []
    for r in dict.fromkeys(normalise_question(x) for x in reference_questions):
        rw = _content_words(r)
        overlap = len(words & rw) / max(1, min(len(words), len(rw)))
        if overlap >= NEAR_OVERLAP or difflib.SequenceMatcher(None, nq, r).ratio() >= NEAR_RATIO:
            out.append(r)
    return out


@dataclass(frozen=True)
class HoldOut:
    """Which TruthfulQA questions are held out of judge training (normalised question text)."""

    spec: str
    splits: tuple[str, ...]
    seed: int
    fractions: tuple[float, float, float]
    max_questions: int | None
    held_out: frozenset[str]
    all_questions: frozenset[str]

    def assign(self, judge_questions: Sequence[str]) -> dict[str, str]:
        """Each judge-data question -> 'held_out' (an evaluation question), 'near_held_out' (unmatched but
        resembling an evaluation question: neither trained nor evaluated on), 'train' (matched to a
        question outside the held-out splits) or 'unmatched' (no TruthfulQA question near it: trained on)."""
        match = match_questions(judge_questions, sorted(self.all_questions))
        out = {}
        for q, m in match.items():
            if m is not None:
                out[q] = "held_out" if m in self.held_out else "train"
            elif any(r in self.held_out for r in near_questions(q, sorted(self.all_questions))):
                out[q] = "near_held_out"
            else:
                out[q] = "unmatched"
        return out

    def describe(self) -> dict:
        return {"spec": self.spec, "splits": list(self.splits), "seed": self.seed, "fractions": list(self.fractions),
                "max_questions": self.max_questions, "n_held_out_questions": len(self.held_out),
                "n_questions": len(self.all_questions)}


def load_holdout(spec: str, splits: Sequence[str] = ("test",), seed: int = 0,
                 fractions: Sequence[float] = (0.6, 0.2, 0.2), max_questions: int | None = None) -> HoldOut:
    """The questions of `splits` under the study's own seeded question-level split (data.load_behaviour)."""
    from locaudit.data import load_behaviour

    data = load_behaviour(spec, seed=seed, fractions=tuple(fractions), max_questions=max_questions)
    held: set[str] = set()
    for s in splits:
        held |= {normalise_question(q.question) for q in data.questions(s)}
    return HoldOut(spec, tuple(splits), seed, tuple(float(f) for f in fractions), max_questions, frozenset(held),
                   frozenset(normalise_question(q.question) for q in data.questions()))
