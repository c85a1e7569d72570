"""The real work of each trial kind, registered in one table, and the group function executors call.

`run_group(trials, spec, run_dir)` keeps one `RunContext` per process (model, data, judge, activations
and probes loaded once and reused by every trial that process runs) and yields each trial's metrics and
artifact paths (relative to the run folder) as soon as the trial is finished.

Modules, one job each:
  context.py     RunContext (the loaded objects a process shares), EvalView, the study's model
  evaluation.py  score an edit as the trial's content says (test split, and validation for selection)
  shared.py      collect, probe, localize (causal rankings), judge: the results other trials read
  heuristic.py   baseline, ITI, and 'select' (an edit scored on validation, to choose grid points)
  optimal.py     optimal edits, trained in groups

Each step reads its trial's typed payload (`t.as_(ITITrial)`, study/payloads.py) and gets paths from the run
folder's layout (`ctx.run`, study/rundir.py) and shared results from `ctx.results` (activations, probes,
causal rankings). A trial's folder trials/KEY is written into a temporary sibling (`RunContext.trial_dir`) and
renamed into place whole by the driver once the trial is recorded as done, with its checksums and result.json
(runner._record).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from locaudit.errors import ConfigError
from locaudit.study.spec import StudySpec
from locaudit.study.steps.context import (EvalView, RunContext, clear_contexts, context, load_study_model,
                                          seed_everything)
from locaudit.study.steps.evaluation import evaluate, flatten_metrics
from locaudit.study.steps.heuristic import run_baseline, run_iti, run_select
from locaudit.study.steps.optimal import TRAINED_MARKER, run_optimal, trained_ok
from locaudit.study.trials import training_key
from locaudit.study.steps.shared import run_collect, run_judge, run_localize, run_probe
from locaudit.study.trials import Trial

__all__ = ["STEPS", "BATCHED", "register_step", "run_group", "RunContext", "EvalView", "context", "clear_contexts",
           "load_study_model", "seed_everything", "evaluate", "flatten_metrics", "TRAINED_MARKER", "training_key",
           "trained_ok"]

# kind -> fn(ctx, trial) -> {"metrics": {...}, "artifacts": {...}}
STEPS: dict[str, Callable] = {"collect": run_collect, "probe": run_probe, "localize": run_localize, "judge": run_judge,
                              "baseline": run_baseline, "iti": run_iti, "select": run_select}
# kind -> fn(ctx, trials) -> iterator of (key, result): trials of one group run together (shared training)
BATCHED: dict[str, Callable] = {"optimal": run_optimal}


def register_step(kind: str, fn: Callable, batched: bool = False) -> None:
    """Declare the step of a trial kind (`batched`: fn takes the group's trials and yields (key, result))."""
    STEPS.pop(kind, None)
    BATCHED.pop(kind, None)
    (BATCHED if batched else STEPS)[kind] = fn


def run_group(trials: list[Trial], spec: StudySpec, run_dir: Path) -> Iterator[tuple[str, dict]]:
    """The executors' group function for the real steps (see the module docstring)."""
    ctx = context(spec, run_dir)
    kinds = {t.kind for t in trials}
    if len(kinds) != 1:
        raise ConfigError(f"a trial group mixes kinds {sorted(kinds)}")
    kind = kinds.pop()
    if kind not in STEPS and kind not in BATCHED:
        raise ConfigError(f"unknown trial kind {kind!r}; registered: {sorted(STEPS) + sorted(BATCHED)}")
    try:
        if kind in BATCHED:
            seed_everything(trials[0].key)
            for key, res in BATCHED[kind](ctx, trials):
                yield key, _finished(ctx, key, res)
            return
        for t in trials:
            seed_everything(t.key)
            res = STEPS[kind](ctx, t)
            yield t.key, _finished(ctx, t.key, res)
    finally:  # trials that did not finish (an error, or the driver stopped): their staged folders go
        for t in trials:
            ctx.drop_staged(t.key)


def _finished(ctx: RunContext, key: str, result: dict) -> dict:
    """A step's result as the driver records it: the precision, and the staged trial folder to put in place."""
    return {**_with_precision(ctx, result), "staged": ctx.take_staged(key)}


def _with_precision(ctx: RunContext, result: dict) -> dict:
    """Record, in the trial's ledger row, the precision it actually ran at and the worker's CPU capability
    (a study may resume on another machine, where `auto` resolves differently)."""
    meta = ctx.precision.meta()
    return {**result, "artifacts": {**result.get("artifacts", {}), "precision": meta["precision"],
                                    "cpu_capability": meta["cpu_capability"]}}
