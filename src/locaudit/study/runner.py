"""Run a study into a run folder, resumably.

`run_study(spec, run_dir)` expands the study into trials, records them in the ledger, resets trials
left running by a dead process, then runs every pending trial whose dependencies are done, on the
chosen executor, recording each one as it ends. Done trials are never run again; failed ones only with
``retry_failed=True``. A result with a non-finite metric is recorded as failed; a done trial leaves
``trials/KEY/result.json`` and checksums of its artifact folders, and runs again if they no longer match
(ledger.py). The real steps write a trial's folder into a temporary sibling (`RunContext.trial_dir`); the driver
seals it, writes result.json into it and renames it into place whole once the trial is recorded as done. The per-trial work is a group function (default: `locaudit.study.steps.run_group`,
the real collect / probe / ITI / optimal / evaluation steps); tests inject their own.

Any kind of study runs here: a `StudyPlan` names its trials (dependencies first), its group function and what
it writes into the ledger before the first trial. `head_plan(spec)` is the head study's (study/trials.py
`expand`, the real steps, preregistration); the Hase study plugs in its own (study/hase/run.py `hase_plan`)
and so shares resume, failure handling, the progress display, staged trial folders and the ledger.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from locaudit.errors import ConfigError
from locaudit.study.executors import GroupFn, LocalExecutor, Outcome, RayExecutor
from locaudit.study.ledger import (Heartbeat, Ledger, commit_trial_folders, discard_trial_folders, nonfinite_message,
                                   nonfinite_metrics, recheck_done, seal_artifacts, staged_trial_folders,
                                   write_trial_record)
from locaudit.study.spec import StudySpec
from locaudit.study.trials import Trial, expand

log = logging.getLogger(__name__)
HEARTBEAT_S = 60.0  # how often a run marks itself alive in the ledger (a killed run's trials keep their time)


@dataclass
class RunSummary:
    """What one `run_study` call did."""

    run_dir: Path
    total: int
    added: int
    reset: list[str] = field(default_factory=list)
    ran: int = 0
    done: int = 0
    failed: int = 0
    blocked: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    wall_s: float = 0.0
    names: list[str] = field(default_factory=list)  # the trials that ended in this call, by name, in that order

    def line(self) -> str:
        c = self.counts
        return (f"{self.total} trials ({self.added} new, {len(self.reset)} restarted after an interruption): "
                f"ran {self.ran} now ({self.done} done, {self.failed} failed) in {self.wall_s:.0f} s; ledger: "
                f"{c.get('done', 0)} done, {c.get('failed', 0)} failed, {c.get('pending', 0)} pending"
                + (f", {len(self.blocked)} blocked by failed dependencies" if self.blocked else ""))


@dataclass
class StudyPlan:
    """What `run_study` runs for one kind of study.

    trials: every trial, dependencies first (ledger.sync records them); fn: the group function that runs them
    (executors.GroupFn); prepare(ledger): writes the study's meta into the ledger before any trial runs;
    batch_max: the most trials sharing a batch key that go out as one group; finish(): frees what this process
    loaded for the trials (run at the end, also after an error); label: the progress bar's."""

    trials: list[Trial]
    fn: GroupFn
    prepare: Callable[[Ledger], None]
    batch_max: int = 1
    finish: Callable[[], None] | None = None
    label: str = "study"


def default_group_fn() -> GroupFn:
    from locaudit.study.steps import run_group

    return run_group


def head_plan(spec: StudySpec, fn: GroupFn | None = None) -> StudyPlan:
    """The head study's plan: `expand(spec)`, the real steps unless `fn` is given (tests inject their own), the
    spec, its precision and the preregistered verdict settings in the ledger."""

    def prepare(ledger: Ledger) -> None:
        ledger.set_meta("spec", spec.to_json())
        ledger.set_meta("study_name", spec.name)
        ledger.set_meta("precision", spec.resolved_precision().meta())  # this session's machine (report header)
        from locaudit.study.preregistration import preregister

        preregister(ledger, spec)  # the verdict's settings and the resolved judge, once, before any result

    def finish() -> None:  # free this process's model and activations
        from locaudit.study.steps import clear_contexts

        clear_contexts()

    return StudyPlan(expand(spec), fn or default_group_fn(), prepare, spec.optimal.batch_edits,
                     finish if fn is None else None, f"study {spec.name}")


EXECUTORS = ("local", "ray")


def make_executor(name: str, fn: GroupFn, spec: Any, run_dir: Path, address: str | None = None,
                  cpus: float | None = None, gpus: float | None = None, num_cpus: int | None = None,
                  max_in_flight: int | None = None):
    if name == "local":
        return LocalExecutor(fn, spec, run_dir)
    if name == "ray":
        return RayExecutor(fn, spec, run_dir, address=address, cpus=cpus, gpus=gpus, num_cpus=num_cpus,
                           max_in_flight=max_in_flight)
    raise ConfigError(f"--executor {name!r}: expected 'local' or 'ray'")


def _next_group(todo: list[Trial], status: dict[str, str], batch_max: int) -> list[Trial]:
    """The first ready trial plus (for batchable trials) up to batch_max-1 ready ones sharing its batch key."""
    for i, t in enumerate(todo):
        if all(status.get(d) == "done" for d in t.deps):
            group = [t]
            if t.batch_key and batch_max > 1:
                for u in todo[i + 1:]:
                    if len(group) >= batch_max:
                        break
                    if u.batch_key == t.batch_key and all(status.get(d) == "done" for d in u.deps):
                        group.append(u)
            return group
    return []


def _bring_up_to_date(ledger: Ledger, plan: StudyPlan, retry_failed: bool) -> tuple[dict, list]:
    """The ledger brought up to date with the plan before a run: its trials synced, trials interrupted by a dead
    process reset, done trials whose artifacts fail their checksums made pending, failed ones retried if asked.
    Returns (`Ledger.sync`'s counts, the keys reset)."""
    plan.prepare(ledger)
    sync = ledger.sync(plan.trials)
    reset = ledger.reset_interrupted()
    if reset:
        log.info("restarting %d trial(s) interrupted by a dead process", len(reset))
    if retry_failed:
        n = len(ledger.retry_failed())
        if n:
            log.info("retrying %d failed trial(s)", n)
    deps = {t.key: t.deps for t in plan.trials}
    while True:  # a done trial is trusted only while its artifacts are intact (or, packed, while none reads them)
        todo = {r["key"] for r in ledger.rows() if r["status"] in ("pending", "running")}
        bad = recheck_done(ledger, needed={d for k in todo for d in deps.get(k, ())})
        for key, why in bad:
            log.warning("trial %s runs again: %s", key, why)
        if not bad:  # each pass can only make done trials pending, so this ends
            return sync, reset


def _submit(ex: Any, ledger: Ledger, plan: StudyPlan, todo: list[Trial], status: dict[str, str], started: set[str],
            inflight: set[str], bar: Any, max_trials: int | None, t0: float, max_minutes: float | None) -> list[Trial]:
    """Start groups of ready trials until the executor is full: each marked running in the ledger and in
    `status`, `started` and `inflight`. Returns the trials still to do (none once `max_trials` have started
    or `max_minutes` have passed since `t0`)."""
    while ex.in_flight() < ex.capacity and todo:
        if ((max_trials is not None and len(started) >= max_trials)
                or (max_minutes is not None and time.time() - t0 > 60 * max_minutes)):
            todo = []
            break
        group = _next_group(todo, status, plan.batch_max)
        if not group:
            break
        if max_trials is not None:
            group = group[: max_trials - len(started)]
        keys = [t.key for t in group]
        ledger.mark_running(keys, worker=ex.name)
        for k in keys:
            status[k] = "running"
            started.add(k)
            inflight.add(k)
        todo = [t for t in todo if t.key not in set(keys)]
        ex.submit(group)
        bar.set_postfix_str(f"running {group[0].name[:40]}" + (f" (+{len(group) - 1})" if len(group) > 1
                                                                else ""))
    return todo


def run_study(
    spec: Any,
    run_dir: str | Path,
    executor: str = "local",
    address: str | None = None,
    retry_failed: bool = False,
    fn: GroupFn | None = None,
    kinds: tuple[str, ...] | None = None,
    max_trials: int | None = None,
    cpus: float | None = None,
    gpus: float | None = None,
    num_cpus: int | None = None,
    progress: bool = True,
    plan: StudyPlan | None = None,
    max_minutes: float | None = None,
    max_in_flight: int | None = None,
) -> RunSummary:
    """Run (or resume) `spec` in `run_dir`; see the module docstring. `plan`: the study's trials and group
    function (default: the head study's, `head_plan(spec, fn)`); `kinds` limits which trial kinds run this
    time; `max_trials` stops after that many trials have been started, `max_minutes` starts no trial after
    that many minutes; `max_in_flight` (Ray): at most this many groups at once."""
    t0 = time.time()
    run_dir = Path(run_dir)
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor!r}: expected 'local' or 'ray'")
    if plan is not None and fn is not None:
        raise ConfigError("run_study: give a plan or a group function fn, not both (a plan names its own)")
    plan = plan or head_plan(spec, fn)
    trials = plan.trials
    with Ledger(run_dir, writer=True) as ledger:
        sync, reset = _bring_up_to_date(ledger, plan, retry_failed)
        status = ledger.status_of()
        todo = [t for t in trials if status.get(t.key) == "pending" and (kinds is None or t.kind in kinds)]
        summary = RunSummary(run_dir, sync["total"], sync["added"], reset)
        ex = None
        # the one progress display of a run: the steps show no bars of their own, the bar names the trial running,
        # and log lines print above it instead of through it
        bar = tqdm(total=len(todo), desc=plan.label, unit="trial", disable=not progress)
        quiet_logs = contextlib.ExitStack()
        quiet_logs.enter_context(Heartbeat(ledger, HEARTBEAT_S))  # a killed run's trial time is kept (lost_time)
        if progress:
            from tqdm.contrib.logging import logging_redirect_tqdm

            quiet_logs.enter_context(logging_redirect_tqdm())
        started: set[str] = set()
        inflight: set[str] = set()
        try:
            if todo:
                ex = make_executor(executor, plan.fn, spec, run_dir, address, cpus, gpus, num_cpus, max_in_flight)
            while todo or (ex is not None and ex.in_flight()):
                if ex is not None:
                    todo = _submit(ex, ledger, plan, todo, status, started, inflight, bar, max_trials, t0, max_minutes)
                if ex is None or not ex.in_flight():
                    break  # what is left waits on dependencies that failed or were not run
                for trial, outcome in ex.collect():
                    _record(ledger, trial, outcome)
                    inflight.discard(trial.key)
                    status[trial.key] = outcome.status
                    summary.ran += 1
                    summary.done += outcome.status == "done"
                    summary.failed += outcome.status == "failed"
                    summary.names.append(trial.name)
                    bar.update(1)
                    bar.set_postfix_str(f"{trial.name[:40]} {outcome.status}")
        except BaseException:
            if ex is not None:
                ex.cancel()
            ledger.release(sorted(inflight))
            raise
        finally:
            quiet_logs.close()
            bar.close()
            if ex is not None:
                ex.shutdown()
            if plan.finish is not None:
                plan.finish()
        summary.blocked = [t.key for t in todo]
        summary.counts = ledger.counts()
    summary.wall_s = time.time() - t0
    return summary


def _record(ledger: Ledger, trial: Trial, outcome: Outcome) -> None:
    """Record a trial's end. A done trial's metrics are validated, its artifacts sealed by checksums and its
    result.json written, all inside its staged trial folder (`Outcome.staged`, from the real steps), which is
    then put in place of trials/KEY whole: a trial folder is never half written where it would be read. A
    trial that fails here or in its step leaves trials/KEY as it was and its staging folder is removed."""
    staged: dict = {}
    try:
        staged = staged_trial_folders(ledger.run_dir, trial, outcome.staged)
    except ValueError as e:
        if outcome.status == "done":
            outcome.status, outcome.error, outcome.metrics = "failed", str(e), {}
    if outcome.status == "done":  # finite or failed; a done trial's artifacts are sealed by checksums
        bad = nonfinite_metrics(outcome.metrics)
        try:
            if bad:
                raise ValueError(nonfinite_message(trial, bad))
            seal_artifacts(ledger.run_dir, outcome.artifacts, staged)
            write_trial_record(ledger.run_dir, trial, "done", outcome.metrics, outcome.artifacts, outcome.started
                               or None, outcome.finished or None, outcome.worker or None, outcome.cpu_s, staged)
            commit_trial_folders(staged)
        except (ValueError, OSError) as e:
            outcome.status, outcome.error, outcome.metrics = "failed", str(e), {}
    if outcome.status != "done":
        discard_trial_folders(staged)
    if outcome.status == "failed":
        first = (outcome.error or "").strip().splitlines()[-1:] or ["?"]
        log.warning("trial %s (%s) failed: %s", trial.key, trial.name, first[0])
    ledger.finish(trial.key, outcome.status, outcome.metrics, outcome.artifacts, outcome.error,
                  started=outcome.started or None, finished=outcome.finished or None, worker=outcome.worker or None,
                  cpu_s=outcome.cpu_s)
