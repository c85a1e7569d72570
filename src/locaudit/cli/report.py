"""`locaudit report`: rebuild a run's report (HTML, figures, tables) from its ledger."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import typer

EXAMPLE = "Example:\n\n  locaudit report runs/quickstart\n\n  locaudit report runs/quickstart --out /tmp/report"


def report(
    run_dir: Path = typer.Argument(..., help="Run folder written by `locaudit run` (holds ledger.sqlite)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write the report (default RUN/report)."),
    resamples: int = typer.Option(9999, "--resamples", help="Permutation and bootstrap resamples."),
) -> None:
    """Rebuild the study report: verdict, statistics (candidate vs random heads, single heads vs full
    alignment), figures, and CSV / Parquet tables. Works on a half-finished or still-running study."""
    from locaudit.errors import ConfigError
    from locaudit.study.ledger import Ledger
    from locaudit.study.report import build_report

    if resamples < 1:
        raise ConfigError(f"--resamples {resamples}: must be at least 1 (default 9999)")
    Ledger(run_dir).close()  # refuse a file, a non-run folder or a damaged ledger before writing anything
    rep = build_report(run_dir, out, n_resamples=resamples)
    c = rep.verdict.get("counts", {})
    typer.echo(f"{c.get('done', 0)} done, {c.get('failed', 0)} failed, {c.get('pending', 0) + c.get('running', 0)} to go")
    typer.echo(rep.verdict["headline"])
    for line in rep.verdict["lines"]:
        typer.echo(f"- {line}")
    typer.echo(f"report: {rep.index}")


def register(app: typer.Typer) -> None:
    app.command("report", help=" ".join(inspect.cleandoc(report.__doc__ or "").split()) + "\n\n" + EXAMPLE)(report)
