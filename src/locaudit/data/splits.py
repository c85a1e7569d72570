"""Question-level, seeded train/val/test splits: no question (and so no answer of it) straddles two splits."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from locaudit.data.types import SPLITS, Question
from locaudit.errors import ConfigError, DataError


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """(train, val, test) fractions: three numbers >= 0 summing to 1, train > 0."""
    try:
        fr = tuple(float(f) for f in fractions)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"fractions={fractions!r}: expected three numbers (train, val, test)") from e
    if len(fr) != 3:
        raise ConfigError(f"fractions={fractions!r}: expected three numbers (train, val, test), got {len(fr)}")
    for name, f in zip(SPLITS, fr):
        if not math.isfinite(f) or f < 0 or f > 1:
            raise ConfigError(f"fractions={fractions!r}: the {name} fraction {f} is not in [0, 1]")
    if fr[0] == 0:
        raise ConfigError(f"fractions={fractions!r}: the train fraction must be > 0")
    if abs(sum(fr) - 1) > 1e-6:
        raise ConfigError(f"fractions={fractions!r}: they sum to {sum(fr):g}, not 1")
    return fr  # type: ignore[return-value]


def split_sizes(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Sizes (train, val, test) for n questions: train and val rounded, test takes the rest."""
    fr = check_fractions(fractions)
    n_train = min(n, round(fr[0] * n))
    n_val = min(n - n_train, round(fr[1] * n))
    if fr[2] == 0:
        n_val = n - n_train
    return n_train, n_val, n - n_train - n_val


def split_questions(
    questions: Sequence[Question], fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0
) -> dict[str, list[Question]]:
    """{'train', 'val', 'test'} -> questions, a seeded shuffle by question.

    The shuffle starts from the questions sorted by qid, so the split depends only on the set of
    questions and the seed, never on file order. Each split keeps that shuffled order.
    """
    qids = [q.qid for q in questions]
    if len(set(qids)) != len(qids):
        dup = next(q for q in qids if qids.count(q) > 1)
        raise DataError(f"split_questions: question id {dup!r} appears more than once")
    order = sorted(questions, key=lambda q: q.qid)
    random.Random(f"locaudit-split-{seed}").shuffle(order)
    n_train, n_val, _ = split_sizes(len(order), fractions)
    return {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


def subsample_questions(questions: Sequence[Question], max_questions: int | None, seed: int = 0) -> list[Question]:
    """A seeded subset of `max_questions` questions (all when None or larger), in the input order."""
    if max_questions is None or max_questions >= len(questions):
        return list(questions)
    if max_questions < 1:
        raise ConfigError(f"max_questions={max_questions}: must be >= 1")
    pool = sorted(questions, key=lambda q: q.qid)
    keep = {q.qid for q in random.Random(f"locaudit-subsample-{seed}").sample(pool, max_questions)}
    return [q for q in questions if q.qid in keep]
