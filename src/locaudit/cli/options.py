"""Options shared by every command that runs a model: one spelling, one help text, checked at parse time.

`--precision auto|fp32|bf16|fp16` (compute precision, models/precision.py), `--device auto|cpu|cuda|cuda:N`,
`--dtype fp32|bf16|fp16` (stored weights), `--model`, `--data` and `--format`. A bad value fails before anything loads, listing the choices.
"""

from __future__ import annotations

import re
from enum import Enum

import typer

from locaudit.models.precision import Precision

PRECISION_HELP = ("Compute precision: auto (bf16 on GPUs and on CPUs where bf16 matmuls are measured faster, "
                  "i.e. with AMX; fp32 on other CPUs, where bf16 is emulated and ~100x slower), fp32, bf16 or fp16.")
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


MODEL_HELP = "HF hub id, local model folder, .gguf file, or smollm2-135m-instruct (the embedded default)."
DATA_HELP = ("Behaviour spec: truthfulqa:PATH.csv, truthfulqa (hub), caa:NAME_OR_PATH or pairs:PATH; split by "
             "question (train/val/test) with --seed and --max-questions.")
FORMAT_HELP = "Prompt format: plain ('Q: ...\\nA: ...') or chat (the model's chat template)."


def model_option() -> str:
    return typer.Option("smollm2-135m-instruct", "--model", help=MODEL_HELP)


def data_option(help: str = DATA_HELP) -> str:
    return typer.Option(..., "--data", help=help)


def format_option() -> str:
    return typer.Option("plain", "--format", help=FORMAT_HELP)


MAX_QUESTIONS_HELP = ("Keep a seeded subset of this many questions, taken before the question-level 60/20/20 "
                      "split (quick runs; use the same value for collect, probe, edit and eval).")


def seed_option(help: str = "Seed of the question-level train/val/test split (the same for every command of "
                            "one experiment).") -> int:
    return typer.Option(0, "--seed", help=help)


def max_questions_option():
    return typer.Option(None, "--max-questions", help=MAX_QUESTIONS_HELP)


def value(x) -> str:
    """An option's plain string (Enum members give their value)."""
    return x.value if isinstance(x, Enum) else str(x)
