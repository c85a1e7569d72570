"""CAA's A/B behaviour datasets (nrimsky/CAA, Rimsky et al. 2024) as preference pairs.

Each record is {question, answer_matching_behavior, answer_not_matching_behavior}; the options are
written inside `question` and the answers are option letters such as "(A)". Convention: chosen = the
answer MATCHING the behaviour (so an edit trained on the pairs steers towards the behaviour, as CAA's
positive vector does); `invert=True` swaps the sides (steer away from it).

Layout under the root: datasets/generate/<name>/generate_dataset.json (the default, CAA's vector
data) and datasets/test/<name>/test_dataset_ab.json (name it 'test/<name>'); the open-ended test questions
(datasets/test/<name>/test_dataset_open_ended.json, CAA's free-text evaluation, judged with the
behaviour's rubric: evaluate/judges/api.py) load with `load_caa_open_ended`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from locaudit.data.types import PreferencePair, question_id
from locaudit.errors import DataError

FIELDS = ("question", "answer_matching_behavior", "answer_not_matching_behavior")


def caa_root(root: str | Path | None = None) -> Path | None:
    """The CAA folder: `root`, else the first data root holding caa/ (data/registry.py: $LOCAUDIT_DATA, the
    repository's sibling ../shared/data, the cache that `locaudit data get caa` fills)."""
    if root is not None:
        return Path(root)
    from locaudit.data.registry import roots

    found = [r / "caa" for w, r in roots() if (r / "caa").is_dir()]
    if found:
        return found[0]
    env = [r / "caa" for w, r in roots() if w.startswith("$")]
    return env[0] if env else None  # named in errors: where the variable says CAA should be


def available_behaviours(root: str | Path | None = None) -> list[str]:
    """Behaviour names under the CAA root (generate sets, then 'test/<name>' A/B test sets)."""
    base = caa_root(root)
    if base is None:
        return []
    names = [p.parent.name for p in sorted((base / "datasets" / "generate").glob("*/generate_dataset.json"))]
    names += [f"test/{p.parent.name}" for p in sorted((base / "datasets" / "test").glob("*/test_dataset_ab.json"))]
    return names


def resolve_caa(name_or_path: str | Path, root: str | Path | None = None) -> Path:
    """A CAA JSON file from a path or a behaviour name ('sycophancy', 'test/sycophancy')."""
    p = Path(name_or_path)
    if p.suffix == ".json" or p.is_file():
        if not p.is_file():
            raise DataError(f"{p}: file not found")
        return p
    base = caa_root(root)
    name = str(name_or_path).strip("/")
    if base is not None:
        if name.startswith("test/"):
            cand = base / "datasets" / "test" / name[len("test/") :] / "test_dataset_ab.json"
        else:
            cand = base / "datasets" / "generate" / name / "generate_dataset.json"
        if cand.is_file():
            return cand
    where = f"under {base}" if base is not None else "(no CAA root: pass root=, set LOCAUDIT_DATA, or give a path)"
    avail = available_behaviours(root)
    raise DataError(f"CAA behaviour {name!r} not found {where}; available: {avail or 'none'}")


def load_caa(name_or_path: str | Path, root: str | Path | None = None, invert: bool = False) -> list[PreferencePair]:
    """CAA A/B items as pairs: chosen = answer_matching_behavior (rejected with `invert=True`)."""
    path = resolve_caa(name_or_path, root)
    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of A/B items, got {type(items).__name__}")
    pairs = []
    for i, item in enumerate(items):
        where = f"{path}: item {i}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected an object with fields {FIELDS}, got {type(item).__name__}")
        for f in FIELDS:
            v = item.get(f)
            if v is None:
                extra = " (an open-ended file? use the A/B file)" if f != "question" else ""
                raise DataError(f"{where}: missing field {f!r}{extra}")
            if not isinstance(v, str) or not v.strip():
                raise DataError(f"{where}: field {f!r} must be a non-empty string, got {v!r}")
        match, other = item["answer_matching_behavior"].strip(), item["answer_not_matching_behavior"].strip()
        if match == other:
            raise DataError(f"{where}: answer_matching_behavior and answer_not_matching_behavior are the same "
                            f"text {match[:60]!r}: such a pair carries no preference")
        chosen, rejected = (other, match) if invert else (match, other)
        q = item["question"].strip()
        pairs.append(PreferencePair(qid=question_id(q, prefix="caa"), question=q, chosen=chosen, rejected=rejected))
    if not pairs:
        raise DataError(f"{path}: no items")
    return pairs


def behaviour_name(name_or_path: str | Path) -> str:
    """The CAA behaviour of a name ('sycophancy', 'test/sycophancy') or a file path (its folder's name)."""
    p = Path(name_or_path)
    if p.suffix == ".json":
        return p.parent.name or p.stem
    return str(name_or_path).strip("/").removeprefix("test/")


def load_caa_open_ended(name_or_path: str | Path, root: str | Path | None = None) -> list[str]:
    """CAA's open-ended test questions of a behaviour (a name, or the path of a test_dataset_open_ended.json)."""
    p = Path(name_or_path)
    if p.suffix == ".json":
        path = p
        if not path.is_file():
            raise DataError(f"{path}: file not found")
    else:
        base = caa_root(root)
        name = behaviour_name(name_or_path)
        path = (base / "datasets" / "test" / name / "test_dataset_open_ended.json") if base is not None else None
        if path is None or not path.is_file():
            where = f"under {base}" if base is not None else "(no CAA root: pass root=, set LOCAUDIT_DATA, or give a path)"
            raise DataError(f"CAA open-ended test set of {name!r} not found {where}")
    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(items, list) or not items:
        raise DataError(f"{path}: expected a non-empty JSON list of {{'question': ...}} objects")
    out = []
    for i, item in enumerate(items):
        q = item.get("question") if isinstance(item, dict) else None
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{path}: item {i}: field 'question' must be a non-empty string")
        out.append(q.strip())
    return out
