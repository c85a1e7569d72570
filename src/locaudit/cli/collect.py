"""`locaudit collect`: every head's output at the last token of each probe example, saved to a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from locaudit.cli.options import (
    DType, data_option, device_option, dtype_option,
    format_option, max_questions_option, model_option, precision_option,
    seed_option, value,
)
from locaudit.cli import options as opt
from locaudit.models.precision import Precision, as_precision

EXAMPLE = (
    "Example:\n\n"
    "  locaudit collect --model smollm2-135m-instruct "
    "--data truthfulqa:$(locaudit data path truthfulqa-v1) --format plain --out runs/acts"
)


def collect(
    model: str = model_option(),
    data: str = data_option(),
    fmt: str = format_option(),
    out: Path = typer.Option(..., "--out", help="Folder to write activations.safetensors, examples.jsonl, meta.json."),
    batch_size: int = typer.Option(16, "--batch-size", **opt.count("--batch-size"), help="Texts per forward pass (sorted by length, right-padded)."),
    dtype: DType = dtype_option(),
    precision: Precision = precision_option(),
    device: str = device_option(),
    max_questions: Optional[int] = max_questions_option(),
    seed: int = seed_option('Seed of the question-level train/val/test split and of the appended random questions.'),
    max_length: int = typer.Option(512, "--max-length", **opt.count("--max-length"), help="Longest text in tokens (longer ones are cut "
                                   "from the left, keeping the last token)."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Read/write the content-keyed cache "
                               "(model + data + format), so a repeated run is instant."),
    trust_remote_code: bool = opt.trust_remote_code_option(),
) -> None:
    """Collect per-head activations (o_proj inputs at the last token) of a behaviour's probe examples."""
    from locaudit.data.behaviour import load_behaviour
    from locaudit.data.prompts import PromptFormat
    from locaudit.localize.activations import collect_probe_activations
    from locaudit.models.loading import load_model

    prompt_format = PromptFormat(fmt)
    bd = load_behaviour(data, seed=seed, max_questions=max_questions)
    lm = load_model(model, dtype=value(dtype), device=device, trust_remote_code=trust_remote_code)
    acts = collect_probe_activations(lm, bd, prompt_format, out_dir=out, cache=cache, batch_size=batch_size,
                                     precision=as_precision(value(precision), lm.device), max_length=max_length)
    N, L, H, D = acts.shape
    counts = {s: int(acts.indices(s).numel()) for s in ("train", "val", "test")}
    typer.echo(f"{N} examples x {L} layers x {H} heads x {D} dims ({counts}), precision "
               f"{acts.meta.get('precision', '?')} ({acts.meta.get('cpu_capability', '')}) -> {out}")


def register(app: typer.Typer) -> None:
    app.command("collect", help=(collect.__doc__ or "") + "\n\n" + EXAMPLE)(collect)
