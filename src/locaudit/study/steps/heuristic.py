"""Steps that evaluate without training: the unedited model (baseline) and ITI at one localization and alpha."""

from __future__ import annotations

import torch

from locaudit.errors import ConfigError
from locaudit.study.payloads import BaselineTrial, ITITrial, SelectTrial
from locaudit.study.steps.context import RunContext
from locaudit.study.steps.evaluation import evaluate
from locaudit.study.trials import Trial


def run_baseline(ctx: RunContext, t: Trial) -> dict:
    p = t.as_(BaselineTrial)
    d = ctx.trial_dir(t.key)
    metrics = evaluate(ctx, p.evaluation, None, d / "eval")
    return {"metrics": metrics, "artifacts": {"eval": ctx.rel(d / "eval")}}


def run_iti(ctx: RunContext, t: Trial) -> dict:
    from locaudit.edit.iti import fit_iti

    p = t.as_(ITITrial)
    heads = ctx.heads(t)
    probe = ctx.results.probe(p.probe) if p.direction == "probe" else None
    edit = fit_iti(ctx.results.activations(p.collect), heads, direction=p.direction, probe=probe, alpha=p.alpha)
    if not torch.isfinite(edit.theta).all():
        raise ConfigError(f"trial {t.key} ({t.name}): the ITI edit has non-finite values; likely cause: alpha = "
                          f"{p.alpha} or non-finite activations in {ctx.run.collect(p.collect)}")
    d = ctx.trial_dir(t.key)
    edit.save(d / "edit")
    metrics = evaluate(ctx, p.evaluation, edit, d / "eval")
    metrics["n_edit_heads"] = float(len(heads))
    return {"metrics": metrics, "artifacts": {"edit": ctx.rel(d / "edit"), "eval": ctx.rel(d / "eval"),
                                              "heads": heads.to_string()}}


def run_select(ctx: RunContext, t: Trial) -> dict:
    """Score the edit of trial `of` on the validation split; metrics come back as `val_<name>`."""
    from locaudit.edit.base import load_edit
    from locaudit.study.steps.evaluation import score_split

    p = t.as_(SelectTrial)
    edit = load_edit(ctx.run.root / p.edit_dir)
    sel = p.select
    d = ctx.trial_dir(t.key)
    metrics = score_split(ctx, p.evaluation, edit, sel.split, sel.max_questions, list(sel.metrics), d / "eval")
    return {"metrics": {f"val_{k}": v for k, v in metrics.items()}, "artifacts": {"eval": ctx.rel(d / "eval")}}
