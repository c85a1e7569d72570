"""Preference pairs from in-memory tables: a pandas DataFrame or a HuggingFace `datasets.Dataset`.

Columns: ``prompt``, ``chosen``, ``rejected`` (non-empty strings) and optionally ``qid`` (rows with the
same qid are one question; otherwise the qid is a hash of the prompt). `columns` renames: e.g.
``{"prompt": "question"}`` reads the prompt from a column named ``question``. Each row is checked as
a line of a pairs file is (data/pairs.py), and errors name the row and the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from locaudit.data.behaviour import BehaviourData, build_behaviour, questions_from_pairs
from locaudit.data.pairs import PAIR_FIELDS, pair_from_record
from locaudit.data.types import PreferencePair
from locaudit.errors import DataError


def is_table(obj: object) -> bool:
    """Whether `obj` is a pandas DataFrame or a HuggingFace datasets.Dataset (neither is imported if absent)."""
    mod = type(obj).__module__ or ""
    if mod.startswith("pandas"):
        import pandas as pd

        return isinstance(obj, pd.DataFrame)
    if mod.startswith("datasets"):
        import datasets

        return isinstance(obj, datasets.Dataset)
    return False


def _records(table: Any) -> tuple[list[str], list[dict]]:
    """(column names, row dicts) of a DataFrame or a Dataset."""
    mod = type(table).__module__ or ""
    if mod.startswith("pandas"):
        return [str(c) for c in table.columns], table.to_dict("records")
    if mod.startswith("datasets"):
        return list(table.column_names), [dict(r) for r in table]
    raise DataError(f"expected a pandas DataFrame or a datasets.Dataset, got {type(table).__name__}")


def _clean(v: object) -> object:
    """pandas writes a missing cell as NaN (or None): read it as absent."""
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def pairs_from_table(table: Any, columns: Mapping[str, str] | None = None, name: str = "table") -> list[PreferencePair]:
    """PreferencePairs from the rows of a DataFrame / Dataset with prompt, chosen, rejected (and qid) columns."""
    cols, rows = _records(table)
    rename = dict(columns or {})
    bad = [k for k in rename if k not in (*PAIR_FIELDS, "qid")]
    if bad:
        raise DataError(f"{name}: columns= maps unknown field(s) {bad}; fields are {(*PAIR_FIELDS, 'qid')}")
    source = {f: rename.get(f, f) for f in (*PAIR_FIELDS, "qid")}
    missing = [source[f] for f in PAIR_FIELDS if source[f] not in cols]
    if missing:
        raise DataError(f"{name}: missing column(s) {missing} (found {cols}); pass columns={{'prompt': ...}} "
                        "to read them from other columns")
    pairs = []
    for i, row in enumerate(rows):
        rec = {f: _clean(row.get(c)) for f, c in source.items() if c in row}
        pairs.append(pair_from_record(name, f"row {i}", rec))  # type: ignore[arg-type]
    if not pairs:
        raise DataError(f"{name}: no rows")
    return pairs


def behaviour_from_table(table: Any, name: str = "table", seed: int = 0,
                         fractions: Sequence[float] = (0.6, 0.2, 0.2), max_questions: int | None = None,
                         columns: Mapping[str, str] | None = None) -> BehaviourData:
    """A BehaviourData from a table of preference pairs, split by question like `pairs:PATH` data."""
    from locaudit.data.splits import check_fractions

    check_fractions(fractions)
    pairs = pairs_from_table(table, columns, name)
    return build_behaviour(name, questions_from_pairs(pairs), pairs, [], seed, fractions, max_questions,
                  {"spec": f"table:{name}", "rows": len(pairs), "type": type(table).__name__})
