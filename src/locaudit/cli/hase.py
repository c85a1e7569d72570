"""`locaudit hase`: does localization inform editing? (Hase et al. 2023) — causal tracing vs the best layer
to edit a fact, on known facts (ROME's known_1000.json or any JSONL of subject / prompt / target)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from locaudit.cli import options as opt

hase_app = typer.Typer(
    help=(
        "Does causal tracing tell you which layer to edit? Per fact: trace (ROME's representation denoising) "
        "at every studied layer, edit the fact at each layer (constrained fine-tuning or a rank-one LoRA of "
        "the MLP down-projection or o_proj), then regress edit success on the tracing effect, on the layer, "
        "and on both (Hase et al. 2023), and test whether the layer where tracing peaks edits better than a "
        "random layer.\n\n"
        "Examples:\n\n"
        "  locaudit hase run studies/hase_smollm2.yaml --out runs/hase_smollm2\n\n"
        "  locaudit hase run studies/hase_gptj.yaml --out /shared/runs/hase_gptj --executor ray --ray-address auto\n\n"
        "  locaudit hase dry-run studies/hase_gptj.yaml\n\n"
        "  locaudit hase report runs/hase_smollm2"
    ),
    no_args_is_help=True,
)


@hase_app.command("run")
def run_cmd(
    study: Path = typer.Argument(..., help="Hase study file (YAML): model, facts, tracing, layers, editing."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (ledger.sqlite, trials/, report/); "
                                       "default runs/<name>. Running again resumes it."),
    max_trials: Optional[int] = typer.Option(None, "--max-trials", **opt.count("--max-trials"), help="Start at most this many trials, then stop."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", **opt.positive("--max-minutes"), help="Start no new trial after this many "
                                                "minutes (finished trials are kept; run again to go on)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run failed trials again."),
    executor: str = typer.Option("local", "--executor", help="'local' (this process, one trial at a time) or 'ray' "
                                 "(one Ray task per trial with the CPUs/GPUs of the study's `resources`: facts, "
                                 "then tracing, then every layer's edits in parallel; each worker loads the model "
                                 "once; the run folder must be on storage every Ray node sees)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --executor ray: the cluster to join "
                                              "('auto', 'ray://host:10001'); default: start a local Ray instance "
                                              "on this machine's CPUs."),
    max_in_flight: Optional[int] = typer.Option(None, "--max-in-flight", **opt.count("--max-in-flight"), help="With --executor ray: at most "
                                                "this many trials at once (default: as many as the cluster fits)."),
    report: bool = typer.Option(True, "--report/--no-report", help="Build RUN/report/ at the end."),
) -> None:
    """Run (or resume) a Hase study: facts, tracing, one edit sweep per (problem, method, layer); then the
    R^2 table and the tracing-argmax vs random-layer verdict."""
    from locaudit.study.hase.report import build_report, summary_text
    from locaudit.study.hase.run import run_hase
    from locaudit.study.hase.spec import load_hase_spec

    from locaudit.errors import ConfigError

    if executor not in ("local", "ray"):
        raise ConfigError(f"--executor {executor!r}: expected 'local' or 'ray'")
    if executor != "ray" and (ray_address or max_in_flight):
        raise ConfigError("--ray-address and --max-in-flight need --executor ray")
    spec = load_hase_spec(study)
    run_dir = out or Path("runs") / spec.name
    res = run_hase(spec, run_dir, max_trials=max_trials, retry_failed=retry_failed, max_minutes=max_minutes,
                   executor=executor, ray_address=ray_address, max_in_flight=max_in_flight)
    typer.echo(f"{len(res['ran'])} trial(s) ran in {res['wall_s']:.0f} s; ledger: {res['counts']}")
    if report:
        index = build_report(run_dir)
        typer.echo(summary_text(run_dir))
        typer.echo(f"report: {index}")


@hase_app.command("dry-run")
def dry_run_cmd(study: Path = typer.Argument(..., help="Hase study file (YAML).")) -> None:
    """List the trials a study would run (facts, trace, one edit sweep per problem x method x layer)."""
    from locaudit.study.hase.run import expand_hase, n_layers_of
    from locaudit.study.hase.spec import load_hase_spec

    spec = load_hase_spec(study)
    L = n_layers_of(spec)
    trials = expand_hase(spec, L)
    layers = spec.layer_list(L)
    typer.echo(f"{spec.name}: {len(trials)} trials on {spec.model.name} ({L} layers; edited and traced: {layers})")
    typer.echo(f"facts: up to {spec.facts.max_facts} known facts of {spec.facts.path}; tracing "
               f"{spec.tracing.n_noise} noise samples x {len(layers)} layers x {len(spec.tracing.kinds)} kinds per fact")
    for t in trials:
        typer.echo(f"  {t.key}  {t.name}")


@hase_app.command("report")
def report_cmd(run_dir: Path = typer.Argument(..., help="Run folder of `locaudit hase run`.")) -> None:
    """Rebuild RUN/report/ (R^2 table, verdict, figures, HTML) from the ledger; works mid-study."""
    from locaudit.study.hase.report import build_report, summary_text
    from locaudit.study.ledger import Ledger

    Ledger(run_dir).close()
    index = build_report(run_dir)
    typer.echo(summary_text(run_dir))
    typer.echo(f"report: {index}")


def register(app: typer.Typer) -> None:
    app.add_typer(hase_app, name="hase")
