"""A minimal reader of R's serialization format (XDR, versions 2 and 3) and of R lazy-load databases
(`.rdx` index + `.rdb` blobs), enough to read character vectors and lists of them.

Used to read Jane Austen's novels from Debian's r-cran-janeaustenr package without R (evaluate/texts.py).
Only data types are supported; closures, environments' contents and bytecode raise DataError.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any

from locaudit.errors import DataError

_NIL, _SYM, _LIST, _CHAR, _LGL, _INT, _REAL, _CPLX, _STR, _VEC, _EXPR = 254, 1, 2, 9, 10, 13, 14, 15, 16, 19, 20
_REF = 255
_SPECIAL_ENVS = {242: "emptyenv", 241: "baseenv", 253: "globalenv", 252: "unbound", 251: "missingarg",
                 247: "basenamespace"}


class _Reader:
    def __init__(self, data: bytes, where: str) -> None:
        self.b, self.i, self.where, self.refs = data, 0, where, []

    def _take(self, n: int) -> bytes:
        if self.i + n > len(self.b):
            raise DataError(f"{self.where}: R serialization ends early (at byte {self.i})")
        out = self.b[self.i: self.i + n]
        self.i += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def header(self) -> None:
        fmt = self._take(2)
        if fmt != b"X\n":
            raise DataError(f"{self.where}: not XDR R serialization (starts with {fmt!r})")
        version = self.int()
        self.int(), self.int()
        if version == 3:
            self._take(self.int())  # native encoding name
        elif version != 2:
            raise DataError(f"{self.where}: R serialization version {version} is not supported")

    def item(self) -> Any:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind == _NIL:
            return None
        if kind in _SPECIAL_ENVS:
            return _SPECIAL_ENVS[kind]
        if kind == _REF:
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if kind == _SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if kind in (_LIST, 6):  # pairlist / language object: a named list
            out: dict | list = {}
            items: list = []
            while kind in (_LIST, 6):
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else None
                items.append((tag, self.item()))
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
            if kind != _NIL:
                raise DataError(f"{self.where}: unsupported pairlist tail type {kind}")
            if all(t is not None for t, _ in items):
                out = {t: v for t, v in items}
            else:
                out = [v for _, v in items]
            return out
        if kind == _CHAR:
            n = self.int()
            return None if n == -1 else self._take(n).decode("utf-8", errors="replace")
        if kind in (_LGL, _INT):
            n = self.length()
            value: Any = list(struct.unpack(f">{n}i", self._take(4 * n)))
        elif kind == _REAL:
            n = self.length()
            value = list(struct.unpack(f">{n}d", self._take(8 * n)))
        elif kind == _CPLX:
            n = self.length()
            self._take(16 * n)
            value = None
        elif kind in (_STR, _VEC, _EXPR):
            n = self.length()
            value = [self.item() for _ in range(n)]
        else:
            raise DataError(f"{self.where}: R object type {kind} is not supported by this reader")
        if has_attr:
            attrs = self.item()
            names = attrs.get("names") if isinstance(attrs, dict) else None
            if kind in (_VEC, _EXPR) and isinstance(names, list) and len(names) == len(value):
                return dict(zip(names, value))
        return value


def unserialize(data: bytes, where: str = "R data") -> Any:
    """An R object from its XDR serialization: vectors -> lists, named lists -> dicts, NULL -> None."""
    r = _Reader(data, where)
    r.header()
    return r.item()


def _decompress(blob: bytes, where: str) -> bytes:
    if len(blob) < 5:
        raise DataError(f"{where}: lazy-load blob too short")
    n = struct.unpack(">I", blob[:4])[0]
    kind, body = blob[4:5], blob[5:]
    try:
        if kind == b"Z":
            out = zlib.decompress(body)
        elif kind == b"2":
            out = bz2.decompress(body)
        elif kind == b"X":
            out = lzma.decompress(body)
        elif kind == b"0":
            out = body
        else:  # compression type 1: zlib without a type byte
            out = zlib.decompress(blob[4:])
    except (zlib.error, OSError, lzma.LZMAError) as e:
        raise DataError(f"{where}: cannot decompress ({e})") from e
    if len(out) != n:
        raise DataError(f"{where}: decompressed {len(out)} bytes, the header says {n}")
    return out


def read_lazyload(stem: str | Path) -> dict[str, Any]:
    """Every object of an R lazy-load database `stem.rdx` + `stem.rdb` (e.g. a package's data/Rdata)."""
    stem = Path(stem)
    rdx, rdb = stem.with_suffix(".rdx"), stem.with_suffix(".rdb")
    for f in (rdx, rdb):
        if not f.is_file():
            raise DataError(f"R lazy-load database file {f} does not exist")
    try:
        index = unserialize(gzip.decompress(rdx.read_bytes()), str(rdx))
    except (OSError, EOFError) as e:  # older indexes are zlib-compressed with a length prefix
        index = unserialize(_decompress(rdx.read_bytes(), str(rdx)), str(rdx))
        del e
    variables = index.get("variables") if isinstance(index, dict) else None
    if not isinstance(variables, dict):
        raise DataError(f"{rdx}: no 'variables' index")
    raw = rdb.read_bytes()
    out = {}
    for name, (offset, length) in variables.items():
        out[name] = unserialize(_decompress(raw[offset: offset + length], f"{rdb}:{name}"), f"{rdb}:{name}")
    return out
