"""`locaudit run`: run (or resume) a whole study into a run folder, then build its report."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import typer

EXAMPLE = (
    "Examples:\n\n"
    "  locaudit run studies/quickstart.yaml --out runs/quickstart\n\n"
    "  locaudit run studies/paper.yaml --out runs/paper --executor ray --address auto\n\n"
    "  locaudit run studies/quickstart.yaml --out runs/quickstart --dry-run"
)


def run(
    study: Path = typer.Argument(..., help="Study file (YAML): model, data, localizers, edits, evaluation."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (ledger.sqlite, shared/, trials/, "
                                       "report/). Default: runs/<study name>. Running again resumes it."),
    executor: str = typer.Option("local", "--executor", help="'local' (this process, one trial at a time) or "
                                 "'ray' (one Ray task per trial with the CPUs/GPUs the study's resources ask)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join ('auto', "
                                          "'ray://host:10001'); default: start a local Ray instance."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run failed trials again (otherwise they stay "
                                      "failed; finished trials never run again)."),
    only: Optional[list[str]] = typer.Option(None, "--only", help="Run only these trial kinds this time "
                                              "(collect, probe, judge, baseline, iti, optimal); repeatable."),
    max_trials: Optional[int] = typer.Option(None, "--max-trials", help="Start at most this many trials, then stop."),
    cpus: Optional[float] = typer.Option(None, "--cpus-per-trial", help="Override resources.cpus (Ray)."),
    gpus: Optional[float] = typer.Option(None, "--gpus-per-trial", help="Override resources.gpus (Ray)."),
    num_cpus: Optional[int] = typer.Option(None, "--ray-cpus", help="CPUs of a local Ray instance (default: all)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the trials and their status; run nothing."),
    report: bool = typer.Option(True, "--report/--no-report", help="Build RUN/report/index.html at the end."),
) -> None:
    """Run a study: probe, ITI and optimal edits at the top-K, random, single and all heads, evaluation,
    statistics and report. Resumable: finished trials are kept, interrupted ones restart, failed ones
    wait for --retry-failed."""
    from locaudit.errors import ConfigError
    from locaudit.study.runner import run_study
    from locaudit.study.spec import load_study
    from locaudit.study.trials import KINDS, expand

    spec = load_study(study)
    run_dir = out or Path("runs") / spec.name
    kinds = tuple(only) if only else None
    if kinds:
        bad = sorted(set(kinds) - set(KINDS))
        if bad:
            raise ConfigError(f"--only {bad}: trial kinds are {KINDS}")
    if dry_run:
        trials = expand(spec)
        status: dict[str, str] = {}
        if (run_dir / "ledger.sqlite").exists():
            from locaudit.study.ledger import Ledger

            with Ledger(run_dir) as led:
                status = led.status_of()
        for t in trials:
            typer.echo(f"{t.key}  {status.get(t.key, 'new'):<8} {t.name}")
        by: dict[str, int] = {}
        for t in trials:
            by[t.kind] = by.get(t.kind, 0) + 1
        typer.echo(f"{len(trials)} trials: " + ", ".join(f"{n} {k}" for k, n in by.items()))
        return
    summary = run_study(spec, run_dir, executor=executor, address=address, retry_failed=retry_failed, kinds=kinds,
                        max_trials=max_trials, cpus=cpus, gpus=gpus, num_cpus=num_cpus)
    typer.echo(summary.line())
    if report:
        from locaudit.study.report import build_report

        rep = build_report(run_dir)
        typer.echo(rep.verdict["headline"])
        typer.echo(f"report: {rep.index}")
    if summary.failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("run", help=" ".join(inspect.cleandoc(run.__doc__ or "").split()) + "\n\n" + EXAMPLE)(run)
