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


# ---------------------------------------------------------------------------------------------- atomic folders
def _tree(d):
    return {str(p.relative_to(d)): p.read_text() for p in sorted(d.rglob("*")) if p.is_file()}


def test_atomic_dir_swaps_in_a_complete_folder_and_keeps_the_old_one_on_failure(tmp_path):
    import os
    import stat

    from locaudit.io import atomic_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "unrelated.txt").write_text("keep me")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert _tree(out) == {"unrelated.txt": "keep me"} and os.listdir(tmp_path) == ["out"]

    def refuse(folder):
        raise ValueError(f"{folder.name} is incomplete")

    with pytest.raises(ValueError, match="incomplete"):
        with atomic_dir(out, verify=refuse) as tmp:
            (tmp / "new").write_text("n")
    assert _tree(out) == {"unrelated.txt": "keep me"} and os.listdir(tmp_path) == ["out"]
    old = os.umask(0o002)
    try:
        with atomic_dir(out) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "f").write_text("new")
            os.chmod(tmp / "sub" / "f", 0o600)  # as safetensors / mkstemp leave files
    finally:
        os.umask(old)
    assert _tree(out) == {"sub/f": "new"} and os.listdir(tmp_path) == ["out"]
    assert stat.S_IMODE((out / "sub" / "f").stat().st_mode) == 0o664
    assert stat.S_IMODE(out.stat().st_mode) == 0o775


def test_leftovers_of_killed_processes_are_cleaned_and_a_half_replaced_folder_restored(tmp_path):
    import subprocess

    from locaudit.io import OLD_TAG, TMP_TAG, atomic_dir, clean_stale_temps, clean_tree_temps

    dead = subprocess.Popen(["true"])
    dead.wait()  # a process id that no longer runs
    out = tmp_path / "out"
    (tmp_path / f".out.{TMP_TAG}-{dead.pid}-abc").mkdir()
    (tmp_path / f"out.tmp{dead.pid}").mkdir()  # an export folder left by locaudit before this rule
    (tmp_path / f".other.{TMP_TAG}-{dead.pid}-abc").mkdir()  # another target's: not ours to clean
    live = tmp_path / f".out.{TMP_TAG}-1-abc"  # pid 1 runs: a concurrent writer, left alone
    live.mkdir()
    # killed between the two renames of a replacement: the previous complete folder sits aside
    aside = tmp_path / f".out.{OLD_TAG}-{dead.pid}-abc"
    aside.mkdir()
    (aside / "model").write_text("previous")
    cleaned = clean_stale_temps(out)
    assert len(cleaned) == 3 and _tree(out) == {"model": "previous"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, f".other.{TMP_TAG}-{dead.pid}-abc"])
    with atomic_dir(out) as tmp:
        (tmp / "model").write_text("new")
    assert _tree(out) == {"model": "new"}
    nested = tmp_path / "run" / "trials" / "k"
    nested.mkdir(parents=True)
    (nested / f".result.json.{TMP_TAG}-{dead.pid}-x1.tmp").write_text("{")
    assert len(clean_tree_temps(tmp_path / "run")) == 1 and list(nested.iterdir()) == []


def test_leftovers_of_another_machine_are_kept_while_fresh(tmp_path):
    """A process id means nothing on another machine (a run folder on shared storage): its temporaries are
    removed only once they are a day old."""
    import os
    import time

    from locaudit.io import _HOST, TMP_TAG, clean_stale_temps, temp_sibling

    other = "0" * 8 if _HOST != "0" * 8 else "1" * 8
    fresh = tmp_path / f".out.{TMP_TAG}-h{other}-1234567-abc"
    stale = tmp_path / f".out.{TMP_TAG}-h{other}-7654321-abc"
    fresh.mkdir()
    stale.mkdir()
    day_ago = time.time() - 2 * 86400
    os.utime(stale, (day_ago, day_ago))
    assert clean_stale_temps(tmp_path / "out") == [stale] and fresh.is_dir()
    assert f"-h{_HOST}-{os.getpid()}-" in temp_sibling(tmp_path / "out").name
