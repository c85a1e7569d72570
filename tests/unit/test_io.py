"""locaudit.io: the one JSONL reader every loader uses."""

from __future__ import annotations

import pytest

from locaudit.errors import DataError
from locaudit.io import read_jsonl


def test_read_jsonl_numbers_lines_skips_blanks_and_tolerates_a_bom(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes('\ufeff{"a": 1}\n\n  \n[2]\n"s"\n'.encode("utf-8"))
    assert list(read_jsonl(p)) == [(1, {"a": 1}), (4, [2]), (5, "s")]


def test_read_jsonl_names_the_file_and_line_of_bad_json(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        list(read_jsonl(p))
    p.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: not UTF-8"):
        list(read_jsonl(p))
