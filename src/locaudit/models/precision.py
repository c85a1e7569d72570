"""One precision policy: ``auto | fp32 | bf16 | fp16``, resolved once per job, where the job starts.

Precision here is the *compute* precision of matmuls: under ``bf16``/``fp16`` the model's forward runs
under torch autocast (log-softmax and losses in fp32); ``fp32`` runs the model as it is. The stored weights'
dtype is a separate choice (``--dtype``, default fp32). bf16 runs in one of two forms with the same numbers:
frozen matmul weights held as bf16 copies for the block (``bf16-weights``, `ResolvedPrecision.compute`) or
autocast casting the fp32 weights on every call (``autocast``); trained parameters and their optimiser state
stay fp32 in both.

``auto`` picks, for the device at hand:

- CUDA: bf16 (as bf16 weights) where the GPU supports it, else fp32 (fp16 is never chosen silently).
- CPU: bf16 only where the CPU has hardware bf16 matmuls (AMX tiles or AVX512-BF16) *and* a measured check
  of the whole job's shape (`measure_forms`: a forward pass and a training step of a SmolLM2-wide model in
  fp32, autocast and bf16 weights, weighted as a study spends them) finds a bf16 form at least
  ``MIN_SPEEDUP`` faster; then the faster form. fp32 otherwise. On a CPU with only AVX2 (or AVX512 without
  BF16), bf16 is emulated, ~100x slower than fp32, so ``auto`` is fp32 and nothing is measured.

The measured check runs once per machine (CPU model, capability, torch version, threads) and is cached in
``<cache>/precision/``. ``LOCAUDIT_CPU_CAPABILITY`` overrides what the CPU reports (``AVX2``, ``AVX512``,
``AVX512_BF16`` or ``AMX``), which tests use to fake either kind of machine; under it the measured check is
skipped (a faked AMX is taken to be fast, as bf16 weights).

Entry points (the Python API, the CLI, a study's or config's ``precision`` field) resolve once with
`as_precision` / `resolve_precision`; every function below takes the `ResolvedPrecision` and checks it with
`require_resolved`. The resolved precision and the capability go into every artifact's meta
(`ResolvedPrecision.meta`), and into cache keys where they change numbers (`ResolvedPrecision.key`).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Any, ContextManager, Iterator, Literal

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
    form: str = ""
    """How bf16 runs (numbers are the same either way): "bf16-weights" (frozen fp32 matmul weights held as bf16
    copies for the block, models/fastcast.py) or "autocast" (autocast casts fp32 weights on every call); ""
    at fp32, "autocast" at fp16."""

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

    def compute(self, model: torch.nn.Module, model_dtype: torch.dtype | None = None) -> ContextManager:
        """The context every forward of a job runs in: `autocast(model_dtype)` and, in the "bf16-weights" form,
        bf16 copies of the model's frozen fp32 matmul weights (bit-identical to autocast, without its per-call
        casts). Trained parameters (requires_grad) keep fp32, and so does their optimiser state."""
        return self._compute(model, model_dtype)

    @contextmanager
    def _compute(self, model: torch.nn.Module, model_dtype: torch.dtype | None) -> Iterator[None]:
        """`compute`'s body: entered only by `with` (a context built and never entered must change nothing)."""
        from locaudit.models.fastcast import frozen_bf16_weights

        weights = self.name == "bf16" and self.form == "bf16-weights" and model_dtype in (None, torch.float32)
        with self.autocast(model_dtype), frozen_bf16_weights(model, weights):
            yield

    def meta(self) -> dict[str, str]:
        """For meta.json, ledger rows and report headers."""
        return {"precision": self.name, "precision_requested": self.requested, "device": self.device,
                "cpu_capability": cpu_capability() if self.device == "cpu" else self.capability,
                "capability": self.capability, "precision_reason": self.reason, "precision_form": self.form}

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


FORMS = ("fp32", "autocast", "bf16-weights")
"""The three ways a job can run: (c) fp32; (a) bf16 autocast over the fp32 weights; (b) bf16 autocast with the
frozen weights held as bf16 copies (trained parameters and their optimiser state stay fp32)."""
# How much of a study each measured phase stands for: collection, evaluation and judging are forward passes
# (two parts), training is forward + backward (one part). bf16 must win the weighted total by this margin.
PHASE_WEIGHTS = {"forward": 2.0, "train": 1.0}
MIN_SPEEDUP = 1.1


def _job_model(layers: int = 2, vocab: int = 8192) -> torch.nn.Module:
    """A Llama-shaped model of SmolLM2's width (576 wide, 9 heads of 64, MLP 1536) with `layers` layers:
    what a study's forward and backward passes look like, at a size that times in about a second."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def measure_forms(batch: int = 1, seq: int = 256, repeats: int = 3,
                  model: torch.nn.Module | None = None) -> dict[str, dict[str, float]]:
    """Seconds per phase for each of `FORMS` on this CPU: {form: {"forward": s, "train": s}}, best of `repeats`.

    The forms take turns (round-robin, one call each per round) so that a burst of load from other processes
    slows every form alike: timed one form after another, a busy spell during fp32's turn once made bf16
    autocast look 2.2x faster on a CPU where it is 1.7x slower, and `auto` then ran bf16.

    "forward" is a no-grad forward of `batch` x `seq` tokens (collection, evaluation, judging); "train" is a
    forward and a backward to a trained parameter at the first layer's input, frozen weights (an edit's step).
    Emulated bf16 (no AMX / AVX512-BF16) is two orders of magnitude slower: a form whose first call takes over
    20x fp32's is not timed further.
    """
    from locaudit.models.fastcast import frozen_bf16_weights

    model = model if model is not None else _job_model()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    delta = torch.zeros(model.config.hidden_size, requires_grad=True)

    def shift(_m, _a, out):  # the trained parameter: a shift of the embeddings, so grads flow through every layer
        return out + delta

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=ids)

    def train() -> None:
        h = model.get_input_embeddings().register_forward_hook(shift)
        try:
            model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
        finally:
            h.remove()
            delta.grad = None

    def ctx_for(form: str):
        if form == "fp32":
            return nullcontext
        if form == "autocast":
            return lambda: torch.autocast("cpu", dtype=torch.bfloat16)

        def both():
            from contextlib import ExitStack

            st = ExitStack()
            st.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            st.enter_context(frozen_bf16_weights(model))
            return st
        return both

    def once(fn, ctx) -> float:
        with ctx():
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

    out: dict[str, dict[str, float]] = {form: {} for form in FORMS}
    for phase, fn in (("forward", forward), ("train", train)):
        first = {form: once(fn, ctx_for(form)) for form in FORMS}  # warm-up round
        live = [f for f in FORMS if f == "fp32" or first[f] <= 20 * first["fp32"]]  # emulated bf16: not timed further
        best = {form: (first[form] if form not in live else float("inf")) for form in FORMS}
        for _ in range(repeats):
            for form in live:
                best[form] = min(best[form], once(fn, ctx_for(form)))
        for form in FORMS:
            out[form][phase] = best[form]
    return out


def job_seconds(times: dict[str, float]) -> float:
    """A job's weighted seconds (PHASE_WEIGHTS) from one form's per-phase times."""
    return sum(w * times[phase] for phase, w in PHASE_WEIGHTS.items())


def choose_form(measured: dict[str, dict[str, float]]) -> tuple[str, str]:
    """("fp32" | "autocast" | "bf16-weights", why) from `measure_forms`' output: the fastest bf16 form where it
    beats fp32 on the weighted job by MIN_SPEEDUP, else fp32. A job is never made slower than fp32."""
    t32 = job_seconds(measured["fp32"])
    best = min(("autocast", "bf16-weights"), key=lambda f: job_seconds(measured[f]))
    speed = t32 / job_seconds(measured[best])
    parts = ", ".join(f"{f} {t32 / job_seconds(measured[f]):.2f}x" for f in ("autocast", "bf16-weights"))
    phases = ", ".join(f"{ph} {measured['fp32'][ph] / measured[best][ph]:.2f}x" for ph in PHASE_WEIGHTS)
    if speed >= MIN_SPEEDUP:
        return best, f"bf16 as {best}: a study-shaped job measured {speed:.2f}x faster than fp32 ({phases}; {parts})"
    return "fp32", f"bf16 measured {speed:.2f}x fp32 on a study-shaped job ({parts}): not faster, fp32"


def cpu_bf16_is_fast() -> tuple[bool, str, str]:
    """(bf16 faster, why, the faster bf16 form) on this CPU: hardware check, then `measure_forms`, cached per
    machine. Without bf16 hardware nothing is measured and the form is "bf16-weights" (emulated either way)."""
    cap = cpu_capability()
    if not cpu_has_bf16_hardware(cap):
        return False, f"CPU capability {cap}: no bf16 matmul hardware (bf16 would be emulated)", "bf16-weights"
    if os.environ.get(_CAPABILITY_ENV):
        return True, f"CPU capability {cap} (forced by {_CAPABILITY_ENV}); measured check skipped", "bf16-weights"
    from locaudit.io import cache_dir, write_json_atomic

    path = cache_dir("precision") / f"forms-{_machine_key()}.json"
    measured = None
    if path.exists():
        try:
            measured = json.loads(path.read_text())["seconds"]
            choose_form(measured)
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
            measured = None
    if measured is None:
        measured = measure_forms()
        write_json_atomic(path, {"seconds": measured, "capability": cap, "torch": torch.__version__,
                                 "threads": torch.get_num_threads(), "phase_weights": PHASE_WEIGHTS})
    form, why = choose_form(measured)
    best = min(("autocast", "bf16-weights"), key=lambda f: job_seconds(measured[f]))
    return form != "fp32", f"CPU capability {cap}; {why}", best


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


# The form an explicit precision runs in: bf16 holds bf16 copies of the frozen weights (the same numbers as
# autocast, no per-call casts; edit training has always run this way); fp16 is plain autocast.
_FIXED_FORMS = {"fp32": "", "bf16": "bf16-weights", "fp16": "autocast"}


@lru_cache(maxsize=32)
def _resolve(req: str, dev: str, _fake: str) -> ResolvedPrecision:
    if dev == "cuda":
        major, minor = torch.cuda.get_device_capability()
        bf16_ok = torch.cuda.is_bf16_supported()
        cap = f"cuda sm_{major}{minor}" + (" bf16" if bf16_ok else "")
        if req == "auto":
            name = "bf16" if bf16_ok else "fp32"
            return ResolvedPrecision(name, req, dev, cap, f"auto on {cap}: {name}", _FIXED_FORMS[name])
        if req == "bf16" and not bf16_ok:
            raise ConfigError(f"precision = 'bf16' asked for, but this GPU ({cap}) has no bf16; use fp16 or fp32")
        return ResolvedPrecision(req, req, dev, cap, f"{req} as asked", _FIXED_FORMS[req])
    if dev != "cpu":
        name = "fp32" if req == "auto" else req
        return ResolvedPrecision(name, req, dev, dev, f"{name} on {dev}", _FIXED_FORMS[name])
    cap = cpu_capability()
    if req == "auto":
        fast, why, form = cpu_bf16_is_fast()
        name = "bf16" if fast else "fp32"
        return ResolvedPrecision(name, req, dev, cap, f"auto: {name} ({why})", form if fast else "")
    reason = f"{req} as asked"
    form = _FIXED_FORMS[req]
    if req in ("bf16", "fp16") and not cpu_has_bf16_hardware(cap):
        reason += f"; CPU capability {cap} emulates it, expect it to be far slower than fp32"
        log.warning("precision %s on a CPU with capability %s is emulated and far slower than fp32", req, cap)
    elif req == "bf16":  # in the form this machine runs faster (the measurement auto uses, cached per machine)
        form = cpu_bf16_is_fast()[2]
        reason += f", as {form}"
    return ResolvedPrecision(req, req, dev, cap, reason, form)


def clear_cache() -> None:
    """Forget resolutions made in this process (tests that change the faked capability call it)."""
    _resolve.cache_clear()
    clear = getattr(_real_cpu_capability, "cache_clear", None)  # absent while a test replaces the function
    if clear is not None:
        clear()


PrecisionLike = Any
"""What an entry point accepts as `precision`: None (= "auto") | "auto" | "fp32" | "bf16" | "fp16" | torch.dtype |
ResolvedPrecision (see `as_precision`). Below the entry points every function takes a `ResolvedPrecision`."""


def as_precision(value: PrecisionLike, device: torch.device | str | None = "cpu") -> ResolvedPrecision:
    """Resolve what an ENTRY POINT accepts as `precision` (the Python API, the CLI, a config's field) for `device`.

    None -> "auto" (as every config defaults); a torch dtype -> its name (torch.bfloat16 -> bf16); a string ->
    `resolve_precision` (so "auto" follows the machine); a ResolvedPrecision passes through. Call it once per
    job, where the job starts, and hand the result down: functions below take a `ResolvedPrecision` and check
    it with `require_resolved`.
    """
    if value is None:
        value = "auto"
    elif isinstance(value, torch.dtype):
        value = dtype_name(value)  # raises ConfigError naming the dtype for any other
    return resolve_precision(value, device)


def require_resolved(value: Any, where: str) -> ResolvedPrecision:
    """`value` itself, where it is a ResolvedPrecision; a TypeError naming `where` otherwise.

    Functions below the entry points call it, so that "auto", None or a bare string can never be read
    differently at different depths of one job (None once meant fp32 here while configs meant auto).
    """
    if isinstance(value, ResolvedPrecision):
        return value
    raise TypeError(f"{where}: precision must be a ResolvedPrecision, resolved once where the job starts "
                    f"(locaudit.models.precision.as_precision / resolve_precision); got {value!r}")


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
