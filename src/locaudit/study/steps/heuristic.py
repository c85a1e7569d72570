"""Steps that evaluate without training: the unedited model (baseline) and ITI at one localization and alpha."""

from __future__ import annotations

import torch

from locaudit.errors import ConfigError
from locaudit.study.steps.context import RunContext
from locaudit.study.steps.evaluation import evaluate
from locaudit.study.trials import Trial


def run_baseline(ctx: RunContext, t: Trial) -> dict:
    d = ctx.trial_dir(t.key)
    metrics = evaluate(ctx, t, None, d / "eval")
    return {"metrics": metrics, "artifacts": {"eval": ctx.rel(d / "eval")}}


def run_iti(ctx: RunContext, t: Trial) -> dict:
    from locaudit.edit.iti import fit_iti

    heads = ctx.heads(t)
    c = t.content
    probe = ctx.probe(c["probe"]) if c["direction"] == "probe" else None
    edit = fit_iti(ctx.activations(c["collect"]), heads, direction=c["direction"], probe=probe, alpha=c["alpha"])
    if not torch.isfinite(edit.theta).all():
        raise ConfigError(f"trial {t.key} ({t.name}): the ITI edit has non-finite values; likely cause: alpha = "
                          f"{c['alpha']} or non-finite activations in {ctx.shared_dir('collect', c['collect'])}")
    d = ctx.trial_dir(t.key)
    edit.save(d / "edit")
    metrics = evaluate(ctx, t, edit, d / "eval")
    metrics["n_edit_heads"] = float(len(heads))
    return {"metrics": metrics, "artifacts": {"edit": ctx.rel(d / "edit"), "eval": ctx.rel(d / "eval"),
                                              "heads": heads.to_string()}}


def run_select(ctx: RunContext, t: Trial) -> dict:
    """Score the edit of trial `t.content['of']` on the validation split; metrics come back as `val_<name>`."""
    from locaudit.edit.base import load_edit
    from locaudit.study.steps.evaluation import score_split

    c = t.content
    edit = load_edit(ctx.run_dir / c["edit_dir"])
    sel = c["select"]
    d = ctx.trial_dir(t.key)
    metrics = score_split(ctx, c["evaluation"], edit, sel["split"], sel.get("max_questions"), list(sel["metrics"]),
                          d / "eval")
    return {"metrics": {f"val_{k}": v for k, v in metrics.items()}, "artifacts": {"eval": ctx.rel(d / "eval")}}
