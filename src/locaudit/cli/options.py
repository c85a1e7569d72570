"""Options shared by every command that runs a model: one spelling, one help text, checked at parse time.

`--precision auto|fp32|bf16|fp16` (compute precision, models/precision.py), `--device auto|cpu|cuda|cuda:N`,
`--dtype fp32|bf16|fp16` (stored weights), `--model`, `--data` and `--format`. A bad value fails before anything loads, listing the choices.
Numeric options carry their range in their type (`Number`: `count`, `positive`, `probability`, `bounded`, ...): a
value outside it fails at parse time with one line naming the option, and exit code 2.
"""

from __future__ import annotations

import math
import re
from enum import Enum
from typing import get_args

import annotated_types as at
import typer

from locaudit.errors import LocauditError
from locaudit.fields import config_field, described
from locaudit.models.precision import Precision

PRECISION_HELP = ("Compute precision: auto (bf16 on GPUs with bf16, and on CPUs with AMX or AVX512-BF16 where a "
                  "study-shaped check at first use measures bf16 faster; fp32 elsewhere, where bf16 is emulated), "
                  "fp32, bf16 or fp16. See models/precision.py.")
DEVICE_HELP = "auto (cuda when available, else cpu), cpu, cuda or cuda:N."
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DType(str, Enum):
    """Stored weights' dtype."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


def _device(value: str) -> str:
    if value is None or not _DEVICE.match(value.strip()):
        raise typer.BadParameter(f"{value!r} is not a device; choose auto, cpu, cuda or cuda:N")
    return value.strip()


def precision_option() -> Precision:
    return typer.Option(Precision.auto, "--precision", help=PRECISION_HELP, case_sensitive=False)


def device_option() -> str:
    return typer.Option("auto", "--device", help=DEVICE_HELP, callback=_device)


def dtype_option(help: str = "Stored weights' dtype (compute precision is --precision): fp32, bf16 or fp16.") -> DType:
    return typer.Option(DType.fp32, "--dtype", help=help, case_sensitive=False)


MODEL_HELP = ("HF hub id, local model folder, .gguf file, smollm2-135m-instruct (the embedded default), gemma3-270m, "
              "or tiny:FAMILY[:SEED] (a tiny random model, for trying things out).")
DATA_HELP = ("Behaviour spec: truthfulqa:PATH.csv, truthfulqa (hub), caa:NAME_OR_PATH or pairs:PATH; split by "
             "question (train/val/test) with --seed and --max-questions.")
FORMAT_HELP = "Prompt format: plain ('Q: ...\\nA: ...') or chat (the model's chat template)."


def model_option() -> str:
    return typer.Option("smollm2-135m-instruct", "--model", help=MODEL_HELP)


def data_option(help: str = DATA_HELP) -> str:
    return typer.Option(..., "--data", help=help)


def format_option() -> str:
    return typer.Option("plain", "--format", help=FORMAT_HELP)


MAX_QUESTIONS_HELP = ("Keep a seeded subset of this many questions, taken from each split in proportion AFTER "
                      "the question-level 60/20/20 split of the whole data (so a subset never moves a question "
                      "between splits; data/behaviour.py). Quick runs; use the same value for collect, probe, "
                      "edit and eval.")


MAX_SEED = 2**32 - 1  # seeds are 32-bit: numpy refuses negative ones, torch generators get seed * 1_000_003 + i


def seed_option(help: str = "Seed of the question-level train/val/test split (the same for every command of "
                            "one experiment).") -> int:
    return typer.Option(0, "--seed", **seed_range("--seed"), help=help)


def seed_range(option: str) -> dict:
    """An integer in [0, MAX_SEED]."""
    return _number(option, kind=int, lo=0, hi=MAX_SEED)


def trust_remote_code_option(what: str = "the checkpoint") -> bool:
    return typer.Option(False, "--trust-remote-code", help=f"Run code shipped with {what} (off by default; only "
                        "for models you trust).")


def max_questions_option():
    return typer.Option(None, "--max-questions", **count("--max-questions"), help=MAX_QUESTIONS_HELP)


# ---------------------------------------------------------------------------------------------- numbers
class OptionValueError(LocauditError):
    """A number on the command line outside its option's range. Not a ValueError, so click does not turn it
    into a usage screen: main() prints it as one line and exits with code 2, before anything loads."""


class Number:
    """The type of a numeric option, range included: `typer.Option(16, "--batch-size", **count("--batch-size"))`.

    Parses the text (ints: base 10; floats: any Python float) and refuses NaN, +-inf and values outside
    [lo, hi] (open ends with lo_open / hi_open), naming the option and the value."""

    def __init__(self, option: str, kind: type = int, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> None:
        self.option, self.kind, self.lo, self.hi, self.lo_open, self.hi_open = option, kind, lo, hi, lo_open, hi_open
        self.__name__ = "integer" if kind is int else "number"  # click names the type after the parser

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        fmt = (lambda x: f"{x:g}") if self.kind is float else (lambda x: str(int(x)))
        if self.lo is not None and self.hi is not None:
            return (f"{what} in {'(' if self.lo_open else '['}{fmt(self.lo)}, {fmt(self.hi)}"
                    f"{')' if self.hi_open else ']'}")
        if self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {fmt(self.lo)}"
        if self.hi is not None:
            return f"{what} {'<' if self.hi_open else '<='} {fmt(self.hi)}"
        return what

    @property
    def metavar(self) -> str:
        return ("INT" if self.kind is int else "FLOAT") + "".join(
            f"{op}{x:g}" for op, x in ((">" if self.lo_open else ">=", self.lo), ("<" if self.hi_open else "<=", self.hi))
            if x is not None)

    def __call__(self, raw):
        if raw is None:
            return None
        text = str(raw).strip()
        bad = OptionValueError(f"{self.option} {text}: must be {self.describe()}")
        if isinstance(raw, bool):
            raise bad
        try:
            v = raw if isinstance(raw, (int, float)) else (int(text, 10) if self.kind is int else float(text))
        except ValueError:
            raise bad from None
        if self.kind is int and (not float(v).is_integer()):
            raise bad
        v = self.kind(v) if math.isfinite(v) else v
        if not math.isfinite(v):
            raise bad
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            raise bad
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            raise bad
        return v


def _number(option: str, **kw) -> dict:
    n = Number(option, **kw)
    return {"parser": n, "metavar": n.metavar}


def count(option: str, lo: int = 1) -> dict:
    """An integer >= lo (default 1): sizes, lengths, counts."""
    return _number(option, kind=int, lo=lo)


def positive(option: str, hi: float | None = None) -> dict:
    """A finite number > 0 (and <= hi)."""
    return _number(option, kind=float, lo=0.0, lo_open=True, hi=hi)


def non_negative(option: str, hi: float | None = None) -> dict:
    """A finite number >= 0 (and <= hi)."""
    return _number(option, kind=float, lo=0.0, hi=hi)


def probability(option: str) -> dict:
    """A number in [0, 1]."""
    return _number(option, kind=float, lo=0.0, hi=1.0)


def open_probability(option: str) -> dict:
    """A number strictly between 0 and 1 (a threshold that both classes can reach)."""
    return _number(option, kind=float, lo=0.0, hi=1.0, lo_open=True, hi_open=True)


def bounded(option: str, bound: float) -> dict:
    """A finite number in [-bound, bound]."""
    return _number(option, kind=float, lo=-bound, hi=bound)


# ITI strengths in the literature are 0-30 (ITI's paper: 15); 1e3 leaves a 30x margin above that. Beyond it the
# shift alpha * sigma * u is hundreds of times a head's whole activation spread: no steering experiment, only a
# path to fp16 overflow (edit/base.MAX_EDIT_VALUE bounds |alpha * theta| itself, for any alpha)
MAX_ALPHA = 1e3


# ---------------------------------------------------------------------------------------------- config fields
def config_option(config, name: str, *flags: str, note: str = ""):
    """An option that sets `config`'s field `name` (a pydantic config: TrainConfig, EvalConfig): the field's
    default, its description as the help (then `note`) and, for a number, its range (ge/gt/le/lt) as the type."""
    fi = config_field(config, name)
    kinds = {k for k in (get_args(fi.annotation) or (fi.annotation,)) if k is not type(None)}
    rng: dict = {}
    if kinds in ({int}, {float}):
        bound = {"lo": None, "hi": None, "lo_open": False, "hi_open": False}
        for m in fi.metadata:
            if isinstance(m, (at.Ge, at.Gt)):
                bound.update(lo=getattr(m, "ge", getattr(m, "gt", None)), lo_open=isinstance(m, at.Gt))
            elif isinstance(m, (at.Le, at.Lt)):
                bound.update(hi=getattr(m, "le", getattr(m, "lt", None)), hi_open=isinstance(m, at.Lt))
        rng = _number(flags[0].split("/")[0], kind=kinds.pop(), **bound)
    return typer.Option(fi.default, *flags, help=described(config, name, note), **rng)


def value(x) -> str:
    """An option's plain string (Enum members give their value)."""
    return x.value if isinstance(x, Enum) else str(x)
