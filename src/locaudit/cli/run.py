"""`locaudit run`: run (or resume) a whole study into a run folder, then build its report."""

from __future__ import annotations

import inspect
import shlex
from pathlib import Path
from typing import Optional

import typer

from locaudit.cli.options import PRECISION_HELP
from locaudit.cli import options as opt
from locaudit.models.precision import Precision

EXAMPLE = (
    "Examples:\n\n"
    "  locaudit run studies/quickstart.yaml --out runs/quickstart\n\n"
    "  locaudit run studies/paper.yaml --out runs/paper --executor ray --address auto\n\n"
    "  locaudit run studies/quickstart.yaml --out runs/quickstart --dry-run\n\n"
    "  locaudit run studies/quickstart.yaml --model gemma3-270m   # the same design on Gemma 3 270M"
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
    max_trials: Optional[int] = typer.Option(None, "--max-trials", **opt.count("--max-trials"), help="Start at most this many trials, then stop."),
    cpus: Optional[float] = typer.Option(None, "--cpus-per-trial", **opt.positive("--cpus-per-trial"), help="Override resources.cpus (Ray)."),
    gpus: Optional[float] = typer.Option(None, "--gpus-per-trial", **opt.non_negative("--gpus-per-trial"), help="Override resources.gpus (Ray)."),
    num_cpus: Optional[int] = typer.Option(None, "--ray-cpus", **opt.count("--ray-cpus"), help="CPUs of a local Ray instance (default: all)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the trials and their status, and check the design: "
                                 "per comparison the smallest reachable p-value, the effect detectable with 80% "
                                 "power, equivalence power, cost per trial kind, and warnings; run nothing."),
    pilot: Optional[Path] = typer.Option(None, "--pilot", help="With --dry-run: size the design by a finished "
                                         "pilot's run folder instead of the study's assumptions: its observed "
                                         "spread over random draws, full alignment's gain, the per-question SE "
                                         "(rescaled to this study's question count) and its trial timings."),
    measure: bool = typer.Option(False, "--measure", help="With --dry-run: load the study's model and time an "
                                 "optimizer step, a validation pass and an evaluation on this machine (a few "
                                 "minutes), then estimate the optimal edits' cost, before any pilot has run: a range, "
                                 "from the earliest early stop to the step cap."),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable strict JSON instead of text (with "
                                  "--dry-run: trials and design checks; after a run: the verdict, also with "
                                  "--no-report, which then writes no report folder)."),
    model: Optional[str] = typer.Option(None, "--model", help="Run the study's design on another model: hub id, "
                                        "local folder, .gguf file, smollm2-135m-instruct or gemma3-270m (part of "
                                        "trial keys). The study is renamed <name>-<model>, and so is its default "
                                        "run folder."),
    precision: Optional[Precision] = typer.Option(None, "--precision", case_sensitive=False, help="Override the "
                                                  "study's `precision` field (auto|fp32|bf16|fp16; part of trial keys). "
                                                  + PRECISION_HELP),
    report: bool = typer.Option(True, "--report/--no-report", help="Build RUN/report/index.html at the end."),
    repair: bool = typer.Option(False, "--repair", help="Rebuild a damaged, empty or missing ledger from the trial "
                                "folders first (the old file is kept as ledger.sqlite.damaged-*); intact finished "
                                "trials stay done, the rest run again."),
) -> None:
    """Run a study: probe, ITI and optimal edits at the top-K, random, single and all heads, evaluation,
    statistics and report. Resumable: finished trials are kept, interrupted ones restart (an optimal edit's
    training pass goes on from its last early-stopping check), failed ones wait for --retry-failed."""
    # Long on purpose: most of its lines are its typer options, one per flag of `locaudit run`; the body is one flow
    # from the study file to the run and its report.
    from locaudit.errors import ConfigError
    from locaudit.study.runner import run_study
    from locaudit.study.spec import load_study
    from locaudit.study.trials import KINDS, expand

    spec = load_study(study)
    if model is not None:
        if not model.strip():
            raise ConfigError("--model: empty model name")
        spec = with_model(spec, model.strip())
    if precision is not None:
        spec = spec.model_copy(update={"precision": precision.value})
    run_dir = out or spec.default_run_dir()
    kinds = tuple(only) if only else None
    if kinds:
        bad = sorted(set(kinds) - set(KINDS))
        if bad:
            raise ConfigError(f"--only {bad}: trial kinds are {KINDS}")
    if repair:
        from locaudit.study.ledger import repair as repair_ledger

        r = repair_ledger(run_dir, expand(spec), {"spec": spec.to_json(), "study_name": spec.name})
        typer.echo(f"ledger {run_dir / 'ledger.sqlite'} is healthy: nothing to repair" if r["healthy"] else
                   f"ledger rebuilt ({r['problem']}): {r['restored']} trial(s) restored as done, {r['pending']} "
                   f"to run; backup: {r['backup'] or 'none (there was no ledger file)'}")
    if pilot is not None and not dry_run:
        raise typer.BadParameter("--pilot sizes a design: use it with --dry-run", param_hint="--pilot")
    if measure and not dry_run:
        raise typer.BadParameter("--measure times a design's pieces: use it with --dry-run", param_hint="--measure")
    if dry_run:
        cmd = shlex.join(["locaudit", "run", study.as_posix(), "--out", Path(run_dir).as_posix()]
                         + (["--model", model.strip()] if model is not None else [])
                         + (["--precision", precision.value] if precision is not None else []))  # quoted for a shell
        _dry_run(spec, run_dir, json_out, pilot, measure, cmd)
        return
    summary = run_study(spec, run_dir, executor=executor, address=address, retry_failed=retry_failed, kinds=kinds,
                        max_trials=max_trials, cpus=cpus, gpus=gpus, num_cpus=num_cpus)
    if not json_out:
        typer.echo(summary.line())
    if report:
        from locaudit.study.report import build_report

        rep = build_report(run_dir)
        if json_out:
            typer.echo((rep.out_dir / "verdict.json").read_text(encoding="utf-8").rstrip())
        else:
            typer.echo(rep.verdict["headline"])
            typer.echo(f"report: {rep.index}")
    elif json_out:  # the verdict as the report would give it, with no report folder written
        import shutil
        import tempfile

        from locaudit.study.report import build_report

        tmp = Path(tempfile.mkdtemp(prefix="locaudit-verdict-"))
        try:
            rep = build_report(run_dir, out_dir=tmp / "report")
            typer.echo((rep.out_dir / "verdict.json").read_text(encoding="utf-8").rstrip())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if summary.failed:
        raise typer.Exit(1)


def with_model(spec, model: str):
    """The study with its model replaced (its dtype, device and trust_remote_code kept) and its name
    suffixed with the model's, so that its default run folder and report say which model ran."""
    import re

    from locaudit.study.spec import StudySpec

    data = spec.model_dump()
    data["model"]["name"] = model
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model).name if "/" in model or model.endswith(".gguf") else model)
    data["name"] = f"{spec.name}-{tail.strip('-.') or 'model'}"
    out = StudySpec.model_validate(data)
    out.resolved_model_name()  # an unset ${VAR} fails here, naming it
    return out


def _test_questions(spec) -> int | None:
    """How many questions the verdict is reported on (loads the data file; None if that fails)."""
    try:
        from locaudit.data.behaviour import load_behaviour

        d = spec.data
        data = load_behaviour(spec.resolved_data_spec(), seed=d.seed, fractions=d.fractions,
                              mc_path=spec.resolved_mc_path(), max_questions=d.max_questions)
        n = len(data.questions(spec.evaluation.split))
    except Exception:  # the design checks still run, without the question count
        return spec.evaluation.max_questions
    return min(n, spec.evaluation.max_questions) if spec.evaluation.max_questions else n


def _observed(spec, run_dir: Path) -> tuple[dict[str, str], object, dict[str, list[float]], dict[str, int]]:
    """A run folder's trial status, its comparisons table (None before results), its done trials' wall times by
    kind (each with the time its earlier, unfinished attempts ran) and, by kind, how many of those attempts ran
    for an unknown time (killed before the ledger kept heartbeats: those kinds' times are lower bounds)."""
    from locaudit.study.analysis import analyze, load_per_question, results_frame
    from locaudit.study.ledger import Ledger

    with Ledger(run_dir) as led:
        status = led.status_of()
        rows = led.rows_with_cost()
    timings: dict[str, list[float]] = {}
    unknown: dict[str, int] = {}
    for r in rows:
        if r["status"] == "done" and r.get("duration_s") is not None:
            timings.setdefault(r["kind"], []).append(float(r["duration_s"]) + float(r["lost_s"]))
            if r["lost_unknown"]:
                unknown[r["kind"]] = unknown.get(r["kind"], 0) + int(r["lost_unknown"])
    res = results_frame(rows)
    observed = None
    if not res.empty:
        observed = analyze(res, load_per_question(run_dir, rows), spec.verdict, n_resamples=999).comparisons
    return status, observed, timings, unknown


def _has_run(run_dir: Path) -> bool:
    from locaudit.study.rundir import RunDir

    return RunDir(run_dir).is_run()


def pilot_spread(observed, n_questions: int | None):
    """A pilot's comparisons table, its per-question SE rescaled from the pilot's question count to the
    study's (SE ~ 1/sqrt(n)): the spreads the design is sized by."""
    if observed is None or observed.empty or not n_questions:
        return observed
    out = observed.copy()
    if "n_questions" in out and "se_questions" in out:
        nq = out["n_questions"].astype(float)
        out["se_questions"] = out["se_questions"] * (nq / float(n_questions)) ** 0.5
    return out


def _dry_run(spec, run_dir: Path, as_json: bool, pilot: Path | None = None, measure: bool = False,
             command: str | None = None) -> None:
    """The trials with their status, then the design checks (analysis.design): observed spread and timings
    from a pilot's run folder (--pilot), else from the run folder where it has results, else the study's
    assumptions. `command`: the `locaudit run` line that runs what was checked (kept in the JSON)."""
    from locaudit.errors import LocauditError
    from locaudit.study.analysis import design, design_text
    from locaudit.study.trials import expand

    trials = expand(spec)
    status: dict[str, str] = {}
    observed, timings, unknown = None, {}, {}
    if _has_run(run_dir):
        status, observed, timings, unknown = _observed(spec, run_dir)
    if pilot is not None:
        if not _has_run(pilot):
            raise LocauditError(f"--pilot {pilot}: not a run folder (no ledger.sqlite or trials/)")
        _, p_obs, p_times, p_unknown = _observed(spec, pilot)
        if p_obs is None or p_obs.empty:
            raise LocauditError(f"--pilot {pilot}: the pilot has no finished results to size the design by")
        observed = pilot_spread(p_obs, _test_questions(spec))
        for k, v in p_times.items():
            if k not in timings:
                timings[k] = v
                if k in p_unknown:
                    unknown[k] = p_unknown[k]
    from locaudit.study.trials import KINDS

    by: dict[str, int] = {}
    for t in sorted(trials, key=lambda t: KINDS.index(t.kind) if t.kind in KINDS else len(KINDS)):
        by[t.kind] = by.get(t.kind, 0) + 1
    mean_t = {k: sum(v) / len(v) for k, v in timings.items()}
    todo = {}
    for t in trials:
        if status.get(t.key, "new") != "done":
            todo[t.kind] = todo.get(t.kind, 0) + 1
    d = design(spec, observed, _test_questions(spec), mean_t, todo, unknown)
    if measure:
        from locaudit.study.cost_probe import measure_study

        d["measured_cost"] = measure_study(spec)
    if as_json:
        import json

        from locaudit.io import strict_json

        payload = {"study": spec.name, "run_dir": str(run_dir), "command": command, "counts": by,
                   "trials": [{"key": t.key, "kind": t.kind, "name": t.name, "status": status.get(t.key, "new")}
                              for t in trials], "design": d}
        typer.echo(json.dumps(strict_json(payload), indent=2, allow_nan=False))
        return
    for t in trials:
        typer.echo(f"{t.key}  {status.get(t.key, 'new'):<8} {t.name}")
    typer.echo(f"{len(trials)} trials: " + ", ".join(f"{n} {k}" for k, n in by.items()))
    for line in design_text(d):
        typer.echo(line)
    if measure:
        from locaudit.study.cost_probe import measure_text

        for line in measure_text(d["measured_cost"]):
            typer.echo(line)


def register(app: typer.Typer) -> None:
    app.command("run", help=" ".join(inspect.cleandoc(run.__doc__ or "").split()) + "\n\n" + EXAMPLE)(run)
