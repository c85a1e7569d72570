"""Small I/O helpers: atomic writes, content hashing, the cache folder."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from locaudit.errors import DataError


def cache_dir(*parts: str) -> Path:
    """The cache folder: $LOCAUDIT_CACHE, else $XDG_CACHE_HOME/locaudit, else ~/.cache/locaudit."""
    root = os.environ.get("LOCAUDIT_CACHE")
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
        root = str(Path(xdg) / "locaudit")
    path = Path(root).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates mode 0600; give the file the mode an ordinary open() would (the umask's, or the
        # mode of the file it replaces), so run folders, caches and reports can be shared
        os.chmod(tmp_path, _mode_for(path))
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def process_umask() -> int:
    """The process's umask, read without changing it where /proc allows (thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _mode_for(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~process_umask()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON (RFC 8259): NaN and +-inf are written as null, so any JSON parser reads the file."""
    write_text_atomic(path, json.dumps(strict_json(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def strict_json(obj: Any) -> Any:
    """`obj` as plain JSON values: non-finite floats -> None, numpy values -> Python, Paths -> str."""
    if isinstance(obj, dict):
        return {(k if isinstance(k, str) else json.dumps(k) if isinstance(k, (int, float, bool)) or k is None
                 else str(k)): strict_json(v) for k, v in obj.items()}  # keys as json.dumps would write them
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        return strict_json(obj.item())
    return strict_json(_json_default(obj))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def stable_hash(obj: Any, n: int = 16) -> str:
    """A short sha256 of `obj`'s canonical JSON: the key for content-addressed caches."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def file_sha256(path: str | os.PathLike, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, record) for each non-blank line of a JSONL file (UTF-8, BOM tolerated), streamed;
    a line that is not JSON is a DataError naming the file and line."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None


CHECKSUM_FILE = "checksums.json"


def _artifact_files(folder: Path) -> list[Path]:
    """A folder's files for its checksum manifest: all but the manifest and hidden (temporary) files."""
    return sorted(f for f in folder.rglob("*")
                  if f.is_file() and f.name != CHECKSUM_FILE
                  and not any(part.startswith(".") for part in f.relative_to(folder).parts))


def write_checksums(folder: str | os.PathLike) -> Path:
    """Write ``checksums.json`` (sha256 and size of every file) into `folder`; call it after every other
    file of the folder is written, so a manifest is only ever there for a complete folder."""
    folder = Path(folder)
    files = {str(f.relative_to(folder)): {"sha256": file_sha256(f, 64), "size": f.stat().st_size}
             for f in _artifact_files(folder)}
    out = folder / CHECKSUM_FILE
    write_json_atomic(out, {"algorithm": "sha256", "files": files})
    return out


def has_checksums(folder: str | os.PathLike) -> bool:
    return (Path(folder) / CHECKSUM_FILE).is_file()


def verify_checksums(folder: str | os.PathLike) -> str | None:
    """None if every file listed in `folder`'s ``checksums.json`` is there with its size and sha256;
    else what is wrong, naming the file (a missing or unreadable manifest is wrong too)."""
    folder = Path(folder)
    manifest = folder / CHECKSUM_FILE
    if not folder.is_dir():
        return f"{folder} is missing"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
    except FileNotFoundError:
        return f"{manifest} is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{manifest} is unreadable ({type(e).__name__}: {str(e)[:120]})"
    for rel, want in sorted(files.items()):
        f = folder / rel
        try:
            size = f.stat().st_size
            if size != want.get("size"):
                return f"{f}: size {size} bytes, expected {want.get('size')}"
            if file_sha256(f, 64) != want.get("sha256"):
                return f"{f}: content differs from its checksum"
        except OSError as e:
            return f"{f}: cannot be read ({e.strerror or e})"
    return None


def csv_records(path: str | os.PathLike, required: Iterable[str], text: str | None = None,
                hint: str = "") -> Iterator[tuple[int, dict[str, str]]]:
    """(line, row) for each record of a CSV file (or of `text`, read from `path` beforehand), headers stripped.

    A missing required column or a row with more fields than columns is a DataError naming the file and line;
    `line` is the record's first line (a quoted field may span several)."""
    if text is None:
        try:
            text = Path(path).read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from e
    reader = csv.DictReader(text.splitlines(keepends=True))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} (found {header}){hint}")
    reader.fieldnames = header
    start = 2  # line 1 is the header
    for row in reader:
        line, start = start, reader.line_num + 1
        if None in row:
            raise DataError(f"{path}:{line}: more fields than columns ({len(header)}); check the quoting")
        yield line, row
