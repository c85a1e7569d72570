"""`locaudit pack`: a run folder's results without its recomputable activations, to commit or carry elsewhere."""

from __future__ import annotations

import inspect
from pathlib import Path

import typer

EXAMPLE = (
    "Example:\n\n"
    "  locaudit pack runs/answer-smollm2 --out results/answer-smollm2\n\n"
    "  # on another machine, later:\n\n"
    "  cp -r results/answer-smollm2 runs/answer-smollm2\n\n"
    "  locaudit run studies/answer_smollm2.yaml --out runs/answer-smollm2   # goes on where the pack stood"
)


def pack(
    run: Path = typer.Argument(..., help="The study's run folder (it may be running: the ledger is copied "
                               "consistently, and every folder it calls finished is already sealed)."),
    out: Path = typer.Option(..., "--out", "-o", help="The pack's folder, outside the run folder; an earlier pack "
                             "there is replaced as a whole."),
    activations: bool = typer.Option(False, "--activations/--no-activations", help="Also copy the probe examples' "
                                     "activations (shared/collect-*, tens to hundreds of MB); without them, "
                                     "they are collected again (minutes) only if a trial still to run reads them."),
) -> None:
    """Copy a study run's results into a small folder that `locaudit run --out` resumes from on any machine.

    Kept: the ledger (timings, lost time), every trial's record and evaluation, trained edits, kept scores of
    a group's chunks and the checkpoints of training passes in progress. Left out: activations (unless
    --activations) and the report, both recomputed, and the dataset's own text: evaluation files keep their
    scores by question id (`report --judge` looks the questions up in the study's data). A long study can so
    outlive the machine it started on, and its results can be shared or committed beside the document that
    cites them."""
    from locaudit.study.pack import pack_run

    summary = pack_run(run, out, activations=activations)
    typer.echo(summary.line())


def register(app: typer.Typer) -> None:
    app.command("pack", help=" ".join(inspect.cleandoc(pack.__doc__ or "").split()) + "\n\n" + EXAMPLE)(pack)
