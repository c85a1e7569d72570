"""Strict JSON for every file the report writes: NaN and infinities become null (JSON.parse accepts it)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from locaudit.io import strict_json, write_json_atomic
from locaudit.study.analysis import to_jsonable


def _strict_load(text: str):
    def reject(x):
        raise ValueError(f"non-standard JSON constant {x}")

    return json.loads(text, parse_constant=reject)


def test_write_json_atomic_is_strict(tmp_path: Path) -> None:
    obj = {"nan": float("nan"), "inf": float("inf"), "ninf": -math.inf, "np": np.float64("nan"), "ok": 0.5,
           "arr": np.array([1.0, np.nan, np.inf]), "int": np.int64(3), "bool": np.bool_(False), "path": Path("/a/b"),
           "nested": [{"x": np.float32(2.5), "y": (float("nan"), 1)}], 7: "int key"}
    write_json_atomic(tmp_path / "v.json", obj)
    d = _strict_load((tmp_path / "v.json").read_text())
    assert d["nan"] is None and d["inf"] is None and d["ninf"] is None and d["np"] is None and d["ok"] == 0.5
    assert d["arr"] == [1.0, None, None] and d["int"] == 3 and d["bool"] is False and d["path"] == "/a/b"
    assert d["nested"] == [{"x": 2.5, "y": [None, 1]}] and d["7"] == "int key"
    assert strict_json({"a": [float("nan")]}) == {"a": [None]}


def test_frames_become_strict_records() -> None:
    df = pd.DataFrame({"p": [0.01, np.nan], "name": ["a", None], "flag": [True, False]})
    rec = to_jsonable(df)
    assert rec == [{"p": 0.01, "name": "a", "flag": True}, {"p": None, "name": None, "flag": False}]
    _strict_load(json.dumps(rec, allow_nan=False))
