"""Small I/O helpers: atomic writes, content hashing, the cache folder."""

from __future__ import annotations

import atexit
import csv
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from locaudit.errors import DataError

log = logging.getLogger(__name__)


def cache_dir(*parts: str) -> Path:
    """The cache folder: $LOCAUDIT_CACHE, else $XDG_CACHE_HOME/locaudit, else ~/.cache/locaudit."""
    root = os.environ.get("LOCAUDIT_CACHE")
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
        root = str(Path(xdg) / "locaudit")
    path = Path(root).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


# Temporary siblings are named `.NAME.locaudit-tmp-PID-RANDOM[.tmp]` (and a folder being replaced, for a moment,
# `.NAME.locaudit-old-PID-RANDOM`), so that a later run recognises what a killed process left behind.
TMP_TAG = "locaudit-tmp"
OLD_TAG = "locaudit-old"
TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<tag>locaudit-tmp|locaudit-old)-(?:h(?P<host>[0-9a-f]{8})-)?(?P<pid>\d+)-"
                     r"[0-9a-z_]+(\.tmp)?$")
# this machine, in temporary names: a process id means something only on the machine that wrote it (run folders
# can sit on storage that Ray workers of other machines share); another machine's leftovers go after a day
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_FOREIGN_AGE_S = 86400.0
_LEGACY_RE = re.compile(r"^(?P<name>.+)\.tmp(?P<pid>\d+)$")  # export folders of locaudit <= 0.x: OUT.tmpPID


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def temp_sibling(path: str | os.PathLike, tag: str = TMP_TAG) -> Path:
    """A fresh (not yet created) hidden sibling name of `path` that `clean_stale_temps` recognises."""
    path = Path(path)
    return path.parent / f".{path.name}.{tag}-h{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def clean_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove what killed processes left beside `path` (temporary siblings of a dead process id); a folder
    that was being replaced when its process died is put back where `path` is missing (the previous
    complete output). Returns the paths cleaned or restored."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return []
    done = []
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return []
    for p in entries:
        m = TEMP_RE.match(p.name)
        legacy = _LEGACY_RE.match(p.name) if m is None else None
        hit = m or legacy
        if hit is None or hit.group("name") != path.name:
            continue
        host = m.group("host") if m is not None else None
        if host is not None and host != _HOST:
            try:
                if time.time() - p.lstat().st_mtime < _FOREIGN_AGE_S:
                    continue  # perhaps a live writer on another machine
            except OSError:
                continue
        elif _pid_alive(int(hit.group("pid"))):
            continue
        if m is not None and m.group("tag") == OLD_TAG and not os.path.lexists(path):
            os.replace(p, path)
            log.warning("%s: restored the previous output from %s (left by a killed process)", path, p.name)
        else:
            _remove(p)
            log.info("%s: removed %s, left by a killed process", path, p.name)
        done.append(p)
    return done


def clean_tree_temps(root: str | os.PathLike) -> list[Path]:
    """`clean_stale_temps` for every temporary entry under `root` (a run folder at start-up)."""
    root = Path(root)
    if not root.is_dir():
        return []
    targets: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            m = TEMP_RE.match(n)
            if m is not None:
                targets.add(Path(dirpath) / m.group("name"))
    out: list[Path] = []
    for t in sorted(targets):
        out += clean_stale_temps(t)
    return out


def follow_umask(root: str | os.PathLike) -> None:
    """Give `root` and everything under it the modes an ordinary open()/mkdir() would (the umask's):
    temporary files and folders (mkstemp, mkdtemp, some writers) are 0600/0700."""
    umask = process_umask()
    root = Path(root)
    items = [root] + (list(root.rglob("*")) if root.is_dir() else [])
    for p in items:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP if hasattr(errno, "ENOTSUP") else -1):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_path(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put `new` (a complete file or folder) in place of `target`; the old `target` stays whole until `new`
    is in place (atomic exchange where the system has it, else two renames with the old one kept as a
    recognised sibling that `clean_stale_temps` puts back if the process dies in between), then is removed."""
    new, target = Path(new), Path(target)
    if _STAGING.get(target.absolute()) == new:
        del _STAGING[target.absolute()]
    if not os.path.lexists(target):
        os.replace(new, target)
        return
    if not (target.is_dir() or new.is_dir()):
        os.replace(new, target)  # files: rename(2) is atomic
        return
    if _exchange(new, target):
        _remove(new)  # `new` now holds the old output
        return
    old = temp_sibling(target, OLD_TAG)
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)  # the old output goes back; `new` stays for its owner to remove
        raise
    _remove(old)


_STAGING: dict[Path, Path] = {}  # final path -> this process's staging folder not yet put in place


def staging_dir(final: str | os.PathLike) -> Path:
    """A new, empty temporary folder beside `final` to build an output in, for code that cannot hold a `with`
    block around its writes; put it in place with `replace_path(tmp, final)`. A staging folder of this process
    for the same `final` that was never put in place (a failed build) is removed here, and any left at exit
    by `atexit`; those of dead processes by `clean_stale_temps`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(final)
    old = _STAGING.pop(final.absolute(), None)
    if old is not None and os.path.lexists(old):
        _remove(old)
    tmp = temp_sibling(final)
    tmp.mkdir()
    if not _STAGING:
        atexit.register(_drop_staging)
    _STAGING[final.absolute()] = tmp
    return tmp


def _drop_staging() -> None:
    for tmp in list(_STAGING.values()):
        if os.path.lexists(tmp):
            _remove(tmp)
    _STAGING.clear()


@contextmanager
def atomic_dir(path: str | os.PathLike, verify: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block succeeds (and `verify(tmp)`, if given,
    returns), give it the umask's modes and swap it in place of `path` in one step (`replace_path`). On any
    failure the temporary folder is removed and `path` is untouched. Leftovers of killed processes beside
    `path` are cleaned first (`clean_stale_temps`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    tmp = temp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        if verify is not None:
            verify(tmp)
        follow_umask(tmp)
        replace_path(tmp, path)
    except Exception as e:
        named = named_os_error(e, path, tmp)
        if named is None:
            raise
        raise named from e
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{TMP_TAG}-h{_HOST}-{os.getpid()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates mode 0600; give the file the mode an ordinary open() would (the umask's, or the
        # mode of the file it replaces), so run folders, caches and reports can be shared
        os.chmod(tmp_path, _mode_for(path))
        os.replace(tmp_path, path)
    except Exception as e:
        named = named_os_error(e, path, tmp_path)
        if named is None:
            raise
        raise named from e
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


_OS_ERROR_RE = re.compile(r"\(os error (\d+)\)")


def named_os_error(e: BaseException, path: Path, tmp: Path) -> OSError | None:
    """A failed write into `tmp` (the temporary file or folder of `path`) as an OSError that names what was being
    written, so the CLI's one line says where: write(2) errors (EFBIG under a file-size limit, ENOSPC, EIO) carry
    no file name, safetensors wraps them as ``SafetensorError('... (os error 27)')``, and a name inside `tmp` is
    given as the same name under `path`. None where `e` is no such error (it is raised as it is)."""
    if isinstance(e, OSError):
        if e.errno is None:
            return None
        if e.filename is None:
            return OSError(e.errno, e.strerror or os.strerror(e.errno), str(path))
        name = str(e.filename)
        if name == str(tmp) or name.startswith(str(tmp) + os.sep):
            return OSError(e.errno, e.strerror or os.strerror(e.errno), str(path) + name[len(str(tmp)):])
        return None
    m = _OS_ERROR_RE.search(str(e))
    if m is not None and type(e).__name__ == "SafetensorError":
        n = int(m.group(1))
        return OSError(n, os.strerror(n), str(path))
    return None


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


def key_dump(config, new_fields) -> dict:
    """`config.model_dump()` (a pydantic model) without the fields in `new_fields` that sit at their defaults:
    fields added after trials were run stay out of those trials' keys while they keep the old behaviour."""
    d = config.model_dump()
    for k in new_fields:
        if d[k] == type(config).model_fields[k].default:
            d.pop(k)
    return d


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
