"""`locaudit report`: rebuild a run's report (HTML, figures, tables) from its ledger."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import typer
from locaudit.cli import options as opt

EXAMPLE = ("Example:\n\n  locaudit report runs/quickstart\n\n  locaudit report runs/quickstart --out /tmp/report\n\n"
           "  locaudit report runs/quickstart --judge trained:runs/judge-gemma   # does the verdict depend on the judge?")


def report(
    run_dir: Path = typer.Argument(..., help="Run folder written by `locaudit run` (holds ledger.sqlite)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write the report (default RUN/report)."),
    resamples: int = typer.Option(9999, "--resamples", **opt.count("--resamples"), help="Permutation and bootstrap resamples."),
    judge: Optional[str] = typer.Option(None, "--judge", help="Re-score every finished trial's saved answers with "
                                        "this judge (same specs as the study's evaluation.judge, e.g. trained:DIR, "
                                        "default, api:MODEL@URL) and write the report under it to RUN/report-<judge> "
                                        "(unless --out): True/Info/True*Info change, MC/KL/CE do not."),
    device: str = typer.Option("auto", "--device", help="Device for a judge that runs a model: auto, cpu, cuda."),
) -> None:
    """Rebuild the study report: verdict, statistics (candidate vs random heads, single heads vs full
    alignment), figures, and CSV / Parquet tables. Works on a half-finished or still-running study."""
    from locaudit.errors import ConfigError
    from locaudit.study.ledger import Ledger
    from locaudit.study.report import build_report

    if resamples < 1:
        raise ConfigError(f"--resamples {resamples}: must be at least 1 (default 9999)")
    with Ledger(run_dir) as ledger:  # refuse a file, a non-run folder or a damaged ledger before writing anything
        spec = ledger.get_meta("spec", {}) or {}
    the_judge = None
    if judge:
        from locaudit.study.rejudge import study_judge

        the_judge = study_judge(spec, judge, device)
    rep = build_report(run_dir, out, n_resamples=resamples, judge=the_judge)
    c = rep.verdict.get("counts", {})
    typer.echo(f"{c.get('done', 0)} done, {c.get('failed', 0)} failed, {c.get('pending', 0) + c.get('running', 0)} to go")
    typer.echo(rep.verdict["headline"])
    for line in rep.verdict["lines"]:
        typer.echo(f"- {line}")
    typer.echo(f"report: {rep.index}")


def register(app: typer.Typer) -> None:
    app.command("report", help=" ".join(inspect.cleandoc(report.__doc__ or "").split()) + "\n\n" + EXAMPLE)(report)
