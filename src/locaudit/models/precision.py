"""One precision policy: ``auto | fp32 | bf16 | fp16``, resolved once per process from the real device.

Precision here is the *compute* precision of matmuls: under ``bf16``/``fp16`` the model's forward runs
under torch autocast (weights stay in their stored dtype, log-softmax and losses in fp32); ``fp32`` runs
the model as it is. The stored weights' dtype is a separate choice (``--dtype``, default fp32).

``auto`` picks, for the device at hand:

- CUDA: bf16 where the GPU supports it, else fp16 is *not* chosen silently: fp32.
- CPU: bf16 only where the CPU has hardware bf16 matmuls (AMX tiles or AVX512-BF16) *and* a short
  measured check at first use confirms bf16 matmuls are faster than fp32 there; fp32 otherwise. On a
  CPU with only AVX2, bf16 is emulated: a matmul is ~100x slower than in fp32, so ``auto`` is fp32.

The measured check runs once per machine (CPU model, capability, torch version, threads) and is cached in
``<cache>/precision/``. ``LOCAUDIT_CPU_CAPABILITY`` overrides what the CPU reports (``AVX2``,
``AVX512``, ``AVX512_BF16`` or ``AMX``), which tests use to fake either kind of machine.

The resolved precision and the capability go into every artifact's meta (`ResolvedPrecision.meta`), and
into cache keys where they change numbers (`ResolvedPrecision.key`).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Any, ContextManager, Literal

import torch

from locaudit.errors import ConfigError
from locaudit.models.dtypes import ALIASES, dtype_name

log = logging.getLogger(__name__)


class Precision(str, Enum):
    """Compute precision, as a CLI choice / study field / Python argument."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]
"""The type of a `precision` field in pydantic configs (plain strings in dumps and keys)."""
PRECISIONS: tuple[str, ...] = tuple(p.value for p in Precision)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_CAPABILITY_ENV = "LOCAUDIT_CPU_CAPABILITY"
_FAKE_CAPABILITIES = ("DEFAULT", "AVX2", "AVX512", "AVX512_BF16", "AMX")


@dataclass(frozen=True)
class ResolvedPrecision:
    """What a process computes in, and why.

    name: "fp32" | "bf16" | "fp16" (never "auto"); requested: what the user asked for; device: "cpu" /
    "cuda"; capability: what the hardware offers (e.g. "AVX2", "AMX", "cuda sm_90 bf16"); reason: one line.
    """

    name: str
    requested: str
    device: str
    capability: str
    reason: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for fp32 (no autocast)."""
        return AUTOCAST_DTYPES[self.name]

    @property
    def is_reduced(self) -> bool:
        return self.name != "fp32"

    def autocast(self, model_dtype: torch.dtype | None = None) -> ContextManager:
        """torch.autocast for this precision, or a no-op (fp32, or weights already in that dtype)."""
        dt = self.autocast_dtype
        if dt is None or dt == model_dtype:
            return nullcontext()
        return torch.autocast(device_type=self.device, dtype=dt)

    def meta(self) -> dict[str, str]:
        """For meta.json, ledger rows and report headers."""
        return {"precision": self.name, "precision_requested": self.requested, "device": self.device,
                "cpu_capability": cpu_capability() if self.device == "cpu" else self.capability,
                "capability": self.capability, "precision_reason": self.reason}

    @property
    def key(self) -> str:
        """For cache keys: only what changes numbers (the resolved precision and the device type)."""
        return f"{self.device}:{self.name}"


def parse_precision(value: Any, where: str = "precision") -> str:
    """Validate a precision spelling; raises ConfigError naming `where` and the choices."""
    if isinstance(value, Precision):
        return value.value
    if isinstance(value, ResolvedPrecision):
        return value.name
    v = str(value).strip().lower()
    v = ALIASES.get(v, v)
    if v not in PRECISIONS:
        raise ConfigError(f"{where} = {str(value)[:40]!r}: choose one of {', '.join(PRECISIONS)}")
    return v


def cpu_capability() -> str:
    """The CPU's matmul capability: "AMX", "AVX512_BF16", "AVX512", "AVX2" or "DEFAULT".

    `LOCAUDIT_CPU_CAPABILITY` overrides it (tests fake either kind of machine with it).
    """
    fake = os.environ.get(_CAPABILITY_ENV)
    if fake:
        fake = fake.strip().upper()
        if fake not in _FAKE_CAPABILITIES:
            raise ConfigError(f"{_CAPABILITY_ENV} = {fake[:40]!r}: choose one of {', '.join(_FAKE_CAPABILITIES)}")
        return fake
    return _real_cpu_capability()


@lru_cache(maxsize=1)
def _real_cpu_capability() -> str:
    cpu = getattr(torch, "cpu", None)

    def probe(name: str) -> bool:
        fn = getattr(cpu, name, None)
        try:
            return bool(fn()) if fn is not None else False
        except Exception:  # pragma: no cover - probe unavailable on this build
            return False

    if probe("_is_amx_tile_supported"):
        return "AMX"
    if probe("_is_avx512_bf16_supported"):
        return "AVX512_BF16"
    return str(torch.backends.cpu.get_cpu_capability())


def cpu_has_bf16_hardware(capability: str | None = None) -> bool:
    return (capability or cpu_capability()) in ("AMX", "AVX512_BF16")


def _machine_key() -> str:
    from locaudit.io import stable_hash

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return stable_hash({"cpu": cpu, "cap": cpu_capability(), "torch": torch.__version__,
                        "threads": torch.get_num_threads()})


def measure_bf16_speedup(size: int = 512, repeats: int = 3) -> float:
    """fp32 time / bf16-autocast time of a `size`^3 matmul on this CPU (best of `repeats`); > 1 = bf16 faster.

    Emulated bf16 (AVX2) is two orders of magnitude slower, so a single bf16 matmul at most is run there
    when it is clearly slow (the check stops early, ~0.1 s).
    """
    a = torch.randn(size, size)
    b = torch.randn(size, size)

    def best(fn) -> float:
        fn()  # warm-up
        t = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            t = min(t, time.perf_counter() - t0)
        return t

    t32 = best(lambda: a @ b)
    a16, b16 = a.bfloat16(), b.bfloat16()
    t0 = time.perf_counter()
    a16 @ b16  # warm-up and early exit on emulated bf16
    first = time.perf_counter() - t0
    if first > 20 * t32 and first > 0.02:
        return t32 / first
    t16 = best(lambda: a16 @ b16)
    return t32 / t16


def cpu_bf16_is_fast() -> tuple[bool, str]:
    """Whether bf16 matmuls beat fp32 on this CPU: hardware check, then a measured check cached per machine."""
    cap = cpu_capability()
    if not cpu_has_bf16_hardware(cap):
        return False, f"CPU capability {cap}: no bf16 matmul hardware (bf16 would be emulated)"
    if os.environ.get(_CAPABILITY_ENV):
        return True, f"CPU capability {cap} (forced by {_CAPABILITY_ENV}); measured check skipped"
    from locaudit.io import cache_dir, write_json_atomic

    path = cache_dir("precision") / f"{_machine_key()}.json"
    speedup = None
    if path.exists():
        try:
            speedup = float(json.loads(path.read_text())["bf16_speedup"])
        except (OSError, ValueError, KeyError, TypeError):
            speedup = None
    if speedup is None:
        speedup = measure_bf16_speedup()
        write_json_atomic(path, {"bf16_speedup": speedup, "capability": cap, "torch": torch.__version__,
                                 "threads": torch.get_num_threads()})
    if speedup > 1.2:
        return True, f"CPU capability {cap}; bf16 matmuls measured {speedup:.1f}x faster than fp32"
    return False, f"CPU capability {cap}, but bf16 matmuls measured {speedup:.2f}x fp32 here"


def _device_type(device: torch.device | str | None) -> str:
    if device is None:
        return "cpu"
    if isinstance(device, str):
        device = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
        return torch.device(device).type
    return device.type


def resolve_precision(requested: Any = "auto", device: torch.device | str | None = "cpu") -> ResolvedPrecision:
    """Resolve `requested` ("auto", "fp32", "bf16", "fp16") for `device`; see the module docstring."""
    if isinstance(requested, ResolvedPrecision):
        return requested
    req = parse_precision(requested)
    dev = _device_type(device)
    return _resolve(req, dev, os.environ.get(_CAPABILITY_ENV, ""))


@lru_cache(maxsize=32)
def _resolve(req: str, dev: str, _fake: str) -> ResolvedPrecision:
    if dev == "cuda":
        major, minor = torch.cuda.get_device_capability()
        bf16_ok = torch.cuda.is_bf16_supported()
        cap = f"cuda sm_{major}{minor}" + (" bf16" if bf16_ok else "")
        if req == "auto":
            name = "bf16" if bf16_ok else "fp32"
            return ResolvedPrecision(name, req, dev, cap, f"auto on {cap}: {name}")
        if req == "bf16" and not bf16_ok:
            raise ConfigError(f"precision = 'bf16' asked for, but this GPU ({cap}) has no bf16; use fp16 or fp32")
        return ResolvedPrecision(req, req, dev, cap, f"{req} as asked")
    if dev != "cpu":
        name = "fp32" if req == "auto" else req
        return ResolvedPrecision(name, req, dev, dev, f"{name} on {dev}")
    cap = cpu_capability()
    if req == "auto":
        fast, why = cpu_bf16_is_fast()
        name = "bf16" if fast else "fp32"
        return ResolvedPrecision(name, req, dev, cap, f"auto: {name} ({why})")
    reason = f"{req} as asked"
    if req in ("bf16", "fp16") and not cpu_has_bf16_hardware(cap):
        reason += f"; CPU capability {cap} emulates it, expect it to be far slower than fp32"
        log.warning("precision %s on a CPU with capability %s is emulated and far slower than fp32", req, cap)
    return ResolvedPrecision(req, req, dev, cap, reason)


def clear_cache() -> None:
    """Forget resolutions made in this process (tests that change the faked capability call it)."""
    _resolve.cache_clear()
    clear = getattr(_real_cpu_capability, "cache_clear", None)  # absent while a test replaces the function
    if clear is not None:
        clear()


PrecisionLike = Any
"""None | "auto" | "fp32" | "bf16" | "fp16" | torch.dtype | ResolvedPrecision (see `as_precision`)."""


def as_precision(value: PrecisionLike, device: torch.device | str | None = "cpu") -> ResolvedPrecision:
    """Coerce what a primitive accepts as `precision` to a ResolvedPrecision for `device`.

    None -> fp32 (the exact path); a torch dtype -> its name (torch.bfloat16 -> bf16); a string ->
    `resolve_precision` (so "auto" follows the machine); a ResolvedPrecision passes through.
    """
    if value is None:
        value = "fp32"
    elif isinstance(value, torch.dtype):
        value = dtype_name(value)  # raises ConfigError naming the dtype for any other
    return resolve_precision(value, device)


def migrate_autocast_field(data: Any, where: str) -> Any:
    """Configs written before the precision policy keep loading: an `autocast` entry of a config dict becomes
    `precision` (True -> "auto", False/"none" -> "fp32", "bf16"/"fp16" as they are), with a FutureWarning
    naming both. Use in a pydantic `model_validator(mode="before")`."""
    if not (isinstance(data, dict) and "autocast" in data):
        return data
    import warnings

    data = dict(data)
    old = data.pop("autocast")
    new = "auto" if old is True or str(old).lower() == "true" else "fp32" if old is False else parse_precision(old, f"{where}.autocast")
    data.setdefault("precision", new)
    warnings.warn(f"{where}.autocast = {old!r} is replaced by precision (read as precision = {data['precision']!r})",
                  FutureWarning, stacklevel=3)
    return data
