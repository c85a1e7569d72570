"""TruthfulQA questions from the CSV (v1 817-question or Jan-2025 790-question format) or the HF hub,
and multiple-choice targets from mc_task.json.

Conventions (TruthfulQA's own `split_multi_answer` and the HF `truthful_qa` loader, which ITI reads):
- answer lists are split on ";" and stripped (identical to splitting on "; " for every staged file);
  empty pieces are dropped, and a repeated answer within one list is kept once (v1 repeats 2);
- answers are used as written: no "I have no comment." is added to the correct answers (TruthfulQA
  adds it only inside its BLEU/ROUGE metrics) and no closing period is added;
- `correct` is the "Correct Answers" column (it already holds the best answer); `incorrect` is
  "Incorrect Answers". An answer listed on both sides (v1 has "Unknown" twice) stays on both sides
  here and is skipped only where a pair would compare it with itself (see pairs.py).

Versions: the paper's "817 questions, 60% train -> 6560 pairs" matches the HF hub copy, which is the
Sep-2021 v0 CSV (10876 pairs in all, 60% = 6526 on average over splits); the Oct-2021 v1 CSV that ITI
evaluates with has more reference answers (12350 pairs, 60% = 7410). Use data/v0/TruthfulQA.csv (or
the hub) to reproduce the paper's training set size.
"""

from __future__ import annotations

import json
from pathlib import Path

from locaudit.data.types import MCItem, Question, question_id
from locaudit.errors import DataError
from locaudit.io import csv_records

HUB_ID = "truthfulqa/truthful_qa"
REQUIRED_COLUMNS = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")


def split_answers(text: str) -> tuple[str, ...]:
    """'a; b; c' -> ('a', 'b', 'c'): stripped, empty pieces dropped, repeats kept once (first wins)."""
    return tuple(dict.fromkeys(a.strip() for a in str(text).split(";") if a.strip()))


def load_truthfulqa(path: str | Path | None = None, hub: bool = False) -> list[Question]:
    """TruthfulQA questions in file order, from `path` (CSV) or, with `hub=True`, the HF hub.

    Both CSV formats work (the Jan-2025 one adds 'Best Incorrect Answer'); a UTF-8 BOM is tolerated.
    """
    if hub:
        if path is not None:
            raise DataError(f"load_truthfulqa: pass either a CSV path ({path}) or hub=True, not both")
        return _load_hub()
    if path is None:
        raise DataError("load_truthfulqa: no CSV path given (pass the path of TruthfulQA.csv, or hub=True)")
    return _load_csv(Path(path))


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e


def _load_csv(path: Path) -> list[Question]:
    text = _read_text(path)
    questions: list[Question] = []
    seen: dict[str, int] = {}
    for line, row in csv_records(path, REQUIRED_COLUMNS, text=text, hint="; expected the TruthfulQA CSV format"):
        def field(name: str, required: bool = True) -> str:
            value = (row.get(name) or "").strip()
            if required and not value:
                raise DataError(f"{path}:{line}: field {name!r} is empty")
            return value

        q = field("Question")
        correct, incorrect = split_answers(field("Correct Answers")), split_answers(field("Incorrect Answers"))
        if not correct:
            raise DataError(f"{path}:{line}: field 'Correct Answers' has no answers")
        if not incorrect:
            raise DataError(f"{path}:{line}: field 'Incorrect Answers' has no answers")
        qid = question_id(q)
        if qid in seen:
            raise DataError(f"{path}:{line}: field 'Question' repeats the question of line {seen[qid]}: {q!r}")
        seen[qid] = line
        questions.append(
            Question(
                qid=qid,
                question=q,
                best_answer=field("Best Answer"),
                correct=correct,
                incorrect=incorrect,
                category=field("Category", required=False),
                best_incorrect=field("Best Incorrect Answer", required=False),
            )
        )
    if not questions:
        raise DataError(f"{path}: no questions (the file has a header but no rows)")
    return questions


def import_datasets():
    try:
        import datasets  # noqa: PLC0415 - optional dependency, only for hub=True
    except ImportError as e:
        raise DataError(
            "TruthfulQA from the hub needs the `datasets` package, which is not installed; "
            "pass the path of a TruthfulQA.csv instead "
            "(e.g. truthfulqa:$(locaudit data path truthfulqa-v0))"
        ) from e
    return datasets


def _hub_config(config: str):
    datasets = import_datasets()
    try:
        return datasets.load_dataset(HUB_ID, config, split="validation")
    except Exception as e:  # offline, no cache, hub error: all mean "use a local file"
        raise DataError(
            f"could not load {HUB_ID!r} ({config}) from the HuggingFace hub ({type(e).__name__}: {e}); "
            "the hub may be unreachable or offline (HF_HUB_OFFLINE=1): pass the path of a local "
            "TruthfulQA.csv instead (spec truthfulqa:PATH.csv)"
        ) from e


def _load_hub() -> list[Question]:
    """The hub's 'generation' config (= the Sep-2021 v0 CSV, 817 questions)."""
    out = []
    for i, row in enumerate(_hub_config("generation")):
        where = f"{HUB_ID} generation row {i}"
        correct = tuple(dict.fromkeys(a.strip() for a in row["correct_answers"] if a.strip()))
        incorrect = tuple(dict.fromkeys(a.strip() for a in row["incorrect_answers"] if a.strip()))
        if not correct or not incorrect:
            raise DataError(f"{where}: field {'correct_answers' if not correct else 'incorrect_answers'} is empty")
        out.append(
            Question(
                qid=question_id(row["question"]),
                question=row["question"].strip(),
                best_answer=row["best_answer"].strip(),
                correct=correct,
                incorrect=incorrect,
                category=row.get("category", "") or "",
            )
        )
    return out


def load_mc_hub() -> list[MCItem]:
    """MC items from the hub's 'multiple_choice' config ({choices, labels} targets)."""
    return [
        _mc_item(row, f"{HUB_ID} multiple_choice row {i}") for i, row in enumerate(_hub_config("multiple_choice"))
    ]


def load_mc(path: str | Path) -> list[MCItem]:
    """MC items from mc_task.json (mc1_targets, mc2_targets; mc0_targets in the Jan-2025 file).

    Targets may be {answer: 0/1} (TruthfulQA's file) or {choices: [...], labels: [...]} (the hub's form).
    `qid` is computed from the question text, so it matches the CSV's questions.
    """
    path = Path(path)
    try:
        items = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of MC items, got {type(items).__name__}")
    return [_mc_item(item, f"{path}: item {i}") for i, item in enumerate(items)]


def _targets(item: dict, name: str, where: str, required: bool) -> tuple[tuple[str, ...], tuple[int, ...]]:
    t = item.get(name)
    if t is None:
        if required:
            raise DataError(f"{where}: missing field {name!r}")
        return (), ()
    if isinstance(t, dict) and set(t) == {"choices", "labels"}:
        answers, labels = list(t["choices"]), list(t["labels"])
    elif isinstance(t, dict):
        answers, labels = list(t.keys()), list(t.values())
    else:
        raise DataError(f"{where}: field {name!r} must be an object {{answer: 0/1}}, got {type(t).__name__}")
    if not answers or len(answers) != len(labels):
        raise DataError(f"{where}: field {name!r} has no answers or mismatched choices/labels")
    if any(lab not in (0, 1) or isinstance(lab, bool) for lab in labels):
        raise DataError(f"{where}: field {name!r} has labels other than 0/1: {labels}")
    if not any(labels) or all(labels):
        raise DataError(f"{where}: field {name!r} needs at least one correct (1) and one incorrect (0) answer")
    if name in ("mc0_targets", "mc1_targets") and sum(labels) != 1:
        raise DataError(f"{where}: field {name!r} must have exactly one correct answer, has {sum(labels)}")
    return tuple(str(a).strip() for a in answers), tuple(int(x) for x in labels)


def _mc_item(item, where: str) -> MCItem:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object, got {type(item).__name__}")
    q = item.get("question")
    if not isinstance(q, str) or not q.strip():
        raise DataError(f"{where}: missing or empty field 'question'")
    mc1 = _targets(item, "mc1_targets", where, required=True)
    mc2 = _targets(item, "mc2_targets", where, required=True)
    mc0 = _targets(item, "mc0_targets", where, required=False)
    return MCItem(
        qid=question_id(q),
        question=q.strip(),
        mc1_answers=mc1[0],
        mc1_labels=mc1[1],
        mc2_answers=mc2[0],
        mc2_labels=mc2[1],
        mc0_answers=mc0[0],
        mc0_labels=mc0[1],
    )


def find_mc_file(csv_path: str | Path) -> Path | None:
    """mc_task.json that belongs to a TruthfulQA CSV: beside it (data/v1/, data/v0/) or, for the
    Jan-2025 CSV at the repository root, in data/."""
    p = Path(csv_path)
    for cand in (p.parent / "mc_task.json", p.parent / "data" / "mc_task.json"):
        if cand.is_file():
            return cand
    return None
