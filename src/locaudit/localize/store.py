"""A safetensors file with one float32 tensor, written in place through a memory map.

Collection streams rows into the file as batches finish, so the full [N, L, H, D] result never has
to be assembled in memory; the file is a valid safetensors file that any reader can open.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Sequence

import numpy as np

from locaudit.errors import DataError

_DTYPES = {"F32": np.float32}


def create_tensor_file(path: str | os.PathLike, name: str, shape: Sequence[int],
                       metadata: dict[str, str] | None = None) -> np.memmap:
    """Create `path` holding one zero F32 tensor `name` of `shape`; return a writable memmap of its data."""
    shape = [int(s) for s in shape]
    nbytes = int(np.prod(shape, dtype=np.int64)) * 4
    header: dict = {name: {"dtype": "F32", "shape": shape, "data_offsets": [0, nbytes]}}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        f.truncate(8 + len(blob) + nbytes)
    if nbytes == 0:
        return np.zeros(shape, dtype=np.float32)  # type: ignore[return-value]
    return np.memmap(path, dtype=np.float32, mode="r+", offset=8 + len(blob), shape=tuple(shape))


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The safetensors JSON header of `path` and the byte offset where tensor data starts."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise DataError(f"{path}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise DataError(f"{path}: header length {n} is not plausible; is it a safetensors file?")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the safetensors header ({e})") from e
    return header, 8 + n


def open_tensor(path: str | os.PathLike, name: str, writable: bool = False) -> np.ndarray:
    """Memory-map tensor `name` (F32) of the safetensors file `path` without reading it into memory.

    Read-only maps are copy-on-write, so callers may modify the array without touching the file.
    """
    header, start = read_header(path)
    if name not in header:
        found = sorted(k for k in header if k != "__metadata__")
        raise DataError(f"{path}: no tensor {name!r} (found {found})")
    entry = header[name]
    if entry.get("dtype") not in _DTYPES:
        raise DataError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}, expected F32")
    shape = tuple(int(s) for s in entry["shape"])
    lo, hi = (int(x) for x in entry["data_offsets"])
    expected = int(np.prod(shape, dtype=np.int64)) * 4
    if hi - lo != expected or os.path.getsize(path) < start + hi:
        raise DataError(f"{path}: tensor {name!r} of shape {list(shape)} is truncated or corrupt")
    if expected == 0:
        return np.zeros(shape, dtype=np.float32)
    return np.memmap(path, dtype=np.float32, mode="r+" if writable else "c", offset=start + lo, shape=shape)
