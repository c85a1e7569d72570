"""`locaudit iti`: fit an ITI edit on chosen heads from collected activations; optionally generate answers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from locaudit.cli.options import (
    DType, device_option, dtype_option, max_questions_option,
    precision_option, seed_option, value,
)
from locaudit.cli import options as opt
from locaudit.models.precision import Precision, as_precision

log = logging.getLogger(__name__)

EXAMPLE = (
    "Example:\n\n"
    "  locaudit iti --activations runs/acts --probe runs/probe --heads top16 --alpha 15 --out runs/iti16 "
    "--generate --data truthfulqa:$(locaudit data path truthfulqa-v1) --split test"
)


def iti(
    activations: Path = typer.Option(..., "--activations", help="Folder written by `locaudit collect` "
                                     "(activations.safetensors, examples.jsonl, meta.json)."),
    out: Path = typer.Option(..., "--out", help="Folder for the edit (iti.safetensors, meta.json) and generations."),
    heads: str = typer.Option("top16", "--heads", help="Head set: top16 (needs --probe), random16@3, "
                              "random16@3-top16, single@5, L12, L12H3,L20H1 or all."),
    probe: Optional[Path] = typer.Option(None, "--probe", help="Folder written by `locaudit probe`: its ranking "
                                         "resolves topK heads, its weights give --direction probe."),
    alpha: float = typer.Option(15.0, "--alpha", **opt.bounded("--alpha", opt.MAX_ALPHA), help="Steering strength: alpha * sigma * u is added per head."),
    direction: str = typer.Option("mass_mean", "--direction", help="mass_mean (mean true - mean false "
                                  "activations, ITI's default) or probe (the probe's weight vector)."),
    fit_split: str = typer.Option("train", "--fit-split", help="Split whose activations give the direction "
                                  "and sigma (never the evaluation split)."),
    generate: bool = typer.Option(False, "--generate/--no-generate", help="Also generate greedy answers "
                                  "with the edit for the questions of --split."),
    data: Optional[str] = typer.Option(None, "--data", help="Behaviour spec for --generate, the same one "
                                       "given to `locaudit collect` (e.g. truthfulqa:PATH.csv)."),
    seed: int = seed_option('Question split seed of --data (as for collect).'),
    max_questions: Optional[int] = max_questions_option(),
    split: str = typer.Option("test", "--split", help="Questions to answer with --generate: train, val or test."),
    model: Optional[str] = typer.Option(None, "--model", help="Model for --generate; default: the model "
                                        "recorded in the activations' meta.json."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Prompt format plain|chat for --generate; "
                                      "default: the activations' format."),
    max_new_tokens: int = typer.Option(50, "--max-new-tokens", **opt.count("--max-new-tokens"), help="Greedy tokens per answer at most."),
    batch_size: int = typer.Option(16, "--batch-size", **opt.count("--batch-size"), help="Questions generated together."),
    dtype: DType = dtype_option("Stored weights' dtype for --generate: fp32, bf16 or fp16."),
    precision: Precision = precision_option(),
    device: str = device_option(),
    trust_remote_code: bool = opt.trust_remote_code_option(),
) -> None:
    """Fit ITI steering (mass-mean shift, sigma-scaled) at a head set and save it as an edit folder."""
    from locaudit.edit.iti import fit_iti
    from locaudit.errors import ConfigError
    from locaudit.heads import HeadSet
    from locaudit.localize.activations import ActivationSet

    acts = ActivationSet.load(activations)
    N, L, H, D = acts.shape
    probe_result = None
    if probe is not None:
        from locaudit.localize.probe import ProbeResult

        probe_result = ProbeResult.load(probe)
    ranking = probe_result.ranking() if probe_result is not None else None
    head_set = HeadSet.parse(heads, L, H, ranking)
    if direction == "probe" and probe_result is None:
        raise ConfigError("--direction probe needs --probe DIR")
    edit = fit_iti(acts, head_set, direction=direction, probe=probe_result, split=fit_split, alpha=alpha)
    edit.save(out)
    typer.echo(f"ITI edit at {head_set.name} ({len(head_set)} heads), alpha={alpha}, direction={direction} -> {out}")
    if not generate:
        return
    if data is None:
        raise ConfigError("--generate needs --data (the behaviour spec the activations were collected from)")
    from locaudit.data.behaviour import load_behaviour
    from locaudit.data.prompts import PromptFormat
    from locaudit.evaluate.generate import generate_answers
    from locaudit.models.loading import load_model

    bd = load_behaviour(data, seed=seed, max_questions=max_questions)
    if acts.meta.get("data_fingerprint") and acts.meta["data_fingerprint"] != bd.fingerprint:
        log.warning("--data %s (fingerprint %s) differs from the data the activations came from (%s): "
                    "check --seed/--max-questions, or the fit split may overlap the evaluation split",
                    data, bd.fingerprint, acts.meta["data_fingerprint"])
    lm = load_model(model or acts.meta.get("model") or "smollm2-135m-instruct", dtype=value(dtype),
                    device=device, trust_remote_code=trust_remote_code)
    prompt_format = PromptFormat(fmt or acts.meta.get("format", "plain"))
    path = out / f"generations_{split}.jsonl"
    recs = generate_answers(lm, edit, bd.questions(split), prompt_format, max_new_tokens, batch_size, out_path=path,
                            precision=as_precision(value(precision), lm.device))
    typer.echo(f"{len(recs)} answers for split {split!r} -> {path}")


def register(app: typer.Typer) -> None:
    app.command("iti", help=(iti.__doc__ or "") + "\n\n" + EXAMPLE)(iti)
