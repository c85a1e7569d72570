"""The optimal-edit step: train a group of localized edits in one pass, then evaluate each.

A trained edit lives in shared/optimal-TKEY/, keyed by its training content only (the trial's content
without its evaluation): changing the evaluation re-evaluates, never retrains. A trained edit is kept
when its evaluation fails, so a retry only evaluates again; a folder is trusted only while its files
match their checksums.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from locaudit.errors import LocauditError
from locaudit.io import has_checksums, verify_checksums, write_checksums, write_json_atomic
from locaudit.study.payloads import OptimalTrial
from locaudit.study.steps.context import RunContext
from locaudit.study.steps.dose import DOSE_FILE, TRAINED_MARKER, evaluate_dose, save_snapshots
from locaudit.study.steps.evaluation import evaluate, score_many
from locaudit.study.trials import Trial

log = logging.getLogger(__name__)


def _subsample(items: list, n: int | None, seed: int) -> list:
    if n is None or len(items) <= n:
        return items
    idx = sorted(np.random.default_rng(seed).choice(len(items), size=n, replace=False).tolist())
    return [items[i] for i in idx]


def run_optimal(ctx: RunContext, trials: list[Trial]) -> Iterator[tuple[str, dict]]:
    """Train the group's edits together (equal hyper-parameters but the head set and lr; edit/multi.py runs them
    in passes planned by lowest layer), saving each edit as its pass ends, then evaluate each; an edit already
    trained by an earlier attempt, killed or not, is loaded instead."""
    from locaudit.edit.lora import LoRAEdit
    from locaudit.edit.multi import train_edits

    payload = {t.key: t.as_(OptimalTrial) for t in trials}
    first = payload[trials[0].key]  # the group's shared settings (batch_key: all but location and lr are equal)
    heads = {t.key: ctx.heads(t) for t in trials}
    edit_dir = {t.key: ctx.run.optimal(payload[t.key].training_key()) for t in trials}
    cfg = first.train_config(ctx.precision.name, max_parallel=len(trials))
    todo = [t for t in trials if not trained_ok(edit_dir[t.key]) or stopped_by_warmup(edit_dir[t.key], cfg)]
    for t in todo:  # an untrusted folder loses its marker first: only a complete retraining restores it
        (edit_dir[t.key] / TRAINED_MARKER).unlink(missing_ok=True)
    diverged: list[str] = []
    if todo:
        seed = first.data.seed  # the subsample seed
        train_pairs = _subsample(ctx.data.pairs("train"), first.max_train_pairs, seed)
        val_pairs = _subsample(ctx.data.pairs("val"), first.max_val_pairs, seed + 1)
        at = {t.key: j for j, t in enumerate(todo)}
        pos = {i: at[t.key] for i, t in enumerate(trials) if t.key in at}  # index in trials -> index in todo

        def save(i: int, edit, tlog) -> None:  # each edit as its pass ends: a run killed in a later pass keeps it
            t = todo[i]
            d = edit_dir[t.key]
            if getattr(tlog, "diverged", None):  # never saved: the trial fails with the reason (below)
                diverged.append(f"trial {t.key} ({t.name}): {tlog.diverged}")
                return
            edit.save(d)
            extra = {"best": tlog.best, "steps": len(tlog.steps)} if tlog.best or tlog.snapshots else {}
            if tlog.snapshots:
                extra["dose_steps"] = save_snapshots(edit, tlog, d)
            write_json_atomic(d / TRAINED_MARKER, {"seconds": tlog.seconds, "before": tlog.before, "after": tlog.after,
                                                   "n_train": tlog.n_train, "n_val": tlog.n_val, **extra})
            write_checksums(d)  # last: the folder is trusted only while it matches

        # planned over every edit of the group, trained or not, so that each attempt forms the same passes
        train_edits(ctx.lm, [heads[t.key] for t in trials], train_pairs, val_pairs, ctx.fmt, cfg,
                    lrs=[payload[t.key].lr for t in trials], on_done=lambda i, edit, tlog: save(pos[i], edit, tlog),
                    resume_dir=ctx.run.passes, skip=[i for i, t in enumerate(trials) if t.key not in at])
    bad = {t.key for t in todo if not (edit_dir[t.key] / TRAINED_MARKER).exists()}
    ready = [t for t in trials if t.key not in bad]
    edits = {t.key: LoRAEdit.load(edit_dir[t.key]) for t in ready}
    scored, dose_scored = _score_group(ctx, ready, edits, edit_dir)
    for t in ready:
        d = ctx.trial_dir(t.key)
        edit = edits[t.key]
        metrics = scored[t.key] if t.key in scored else evaluate(ctx, payload[t.key].evaluation, edit, d / "eval")
        trained = json.loads((edit_dir[t.key] / TRAINED_MARKER).read_text())
        metrics["n_edit_heads"] = float(len(heads[t.key]))
        metrics["train_seconds"] = float(trained.get("seconds", float("nan")))
        for k, v in (trained.get("after") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "epoch":
                metrics[f"train_{k}"] = float(v)
        artifacts = {"edit": ctx.rel(edit_dir[t.key]), "eval": ctx.rel(d / "eval"), "heads": heads[t.key].to_string()}
        if payload[t.key].dose_steps:  # the training path's snapshots scored (matched collateral damage)
            dose = evaluate_dose(ctx, t, edit, edit_dir[t.key], metrics, d, dose_scored.get(t.key))
            metrics["n_dose_points"] = float(len(dose["points"]))
            artifacts["dose"] = ctx.rel(d / DOSE_FILE)
        yield t.key, {"metrics": metrics, "artifacts": artifacts}
    if diverged:
        from locaudit.edit.train import TrainingError

        raise TrainingError("; ".join(diverged))


def _score_group(ctx: RunContext, ready: list[Trial], edits: dict, edit_dir: dict) -> tuple[dict, dict]:
    """Every trained edit of the group, and every dose snapshot, scored together (steps.evaluation.score_many):
    {key: metrics}, {key: {step: metrics}}. Trials whose evaluation differs from the first one's (not the case
    within one batch group) are left out and scored alone by the caller."""
    from locaudit.edit.lora import LoRAEdit
    from locaudit.study.steps.dose import DOSE_DIR, dose_metrics, dose_points, final_step

    if not ready:
        return {}, {}
    ev = ready[0].as_(OptimalTrial).evaluation
    same = [t for t in ready if t.as_(OptimalTrial).evaluation == ev]
    n = ev.max_questions
    outs = [ctx.trial_dir(t.key) / "eval" for t in same]
    got = score_many(ctx, ev, [edits[t.key] for t in same], ev.split, n, list(ev.metrics), outs,
                     sources=[edit_dir[t.key] for t in same])
    scored = {t.key: m for t, m in zip(same, got)}
    jobs = []  # (key, step, snapshot folder, out folder)
    for t in same:
        if not t.as_(OptimalTrial).dose_steps:
            continue
        last = final_step(json.loads((edit_dir[t.key] / TRAINED_MARKER).read_text(encoding="utf-8")))
        jobs += [(t.key, step, f, ctx.trial_dir(t.key) / DOSE_DIR / f.name)
                 for step, f in dose_points(edit_dir[t.key]) if step != last]
    dose: dict[str, dict[int, dict]] = {}
    if jobs:
        got = score_many(ctx, ev, [LoRAEdit.load(f) for _, _, f, _ in jobs], ev.split, n, dose_metrics(ctx),
                         [o for *_, o in jobs], sources=[f for _, _, f, _ in jobs])
        for (key, step, _, _), m in zip(jobs, got):
            dose.setdefault(key, {})[step] = m
    return scored, dose


def stopped_by_warmup(d: Path, cfg) -> bool:
    """Whether the trained edit in `d` was stopped by early-stopping evaluations inside its learning-rate warm-up
    (edit.stopping.stopped_in_warmup): trained before those stopped counting, it is retrained under `cfg`."""
    from locaudit.edit.stopping import stopped_in_warmup

    if cfg.eval_every is None:
        return False
    try:
        curve = json.loads((d / "meta.json").read_text(encoding="utf-8")).get("curve") or {}
    except (OSError, ValueError):
        return False  # trained_ok has judged the folder
    if not curve.get("n_train") or not stopped_in_warmup(curve, cfg.warmup_steps(int(curve["n_train"])), cfg.patience):
        return False
    log.warning("retraining the edit in %s: early stopping stopped it at step %s on evaluations inside its "
                "learning-rate warm-up (%d steps), which no longer count against patience", d, curve["stopped_step"],
                cfg.warmup_steps(int(curve["n_train"])))
    return True


def trained_ok(d: Path) -> bool:
    """Whether a trained-edit folder can be trusted: its marker is there and its files match their
    checksums (a folder from before checksums is trusted if it loads and is finite, then sealed)."""
    if not (d / TRAINED_MARKER).exists():
        return False
    if has_checksums(d):
        problem = verify_checksums(d)
        if problem:
            log.warning("retraining the edit in %s: %s", d, problem)
        return problem is None
    from locaudit.edit.lora import LoRAEdit

    try:
        edit = LoRAEdit.load(d)
        json.loads((d / TRAINED_MARKER).read_text(encoding="utf-8"))
    except (LocauditError, OSError, ValueError) as e:
        log.warning("retraining the edit in %s: %s", d, e)
        return False
    if not (torch.isfinite(edit.a).all() and torch.isfinite(edit.b).all()):
        log.warning("retraining the edit in %s: non-finite parameters", d)
        return False
    write_checksums(d)
    return True
