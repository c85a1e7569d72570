"""Dose curves of optimal edits (optimal.dose_steps): the training path's snapshots saved and scored.

Training keeps each edit's state after the steps that the trial's `dose_steps` name (TrainConfig.snapshot_steps);
`save_snapshots` writes them into the trained edit's folder (shared/optimal-TKEY/dose/step-N, sealed with it).
`evaluate_dose` scores each snapshot on the metrics the primary metric needs plus KL on generic text, with the
trial's own evaluation protocol, and writes trials/KEY/dose.json: the path in step order, the trained edit
(its best-validation state under early stopping) at its own step. study/matched_kl.py reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

from locaudit.io import write_json_atomic
from locaudit.study.payloads import OptimalTrial
from locaudit.study.steps.context import RunContext
from locaudit.study.trials import Trial

DOSE_DIR = "dose"
DOSE_FILE = "dose.json"
TRAINED_MARKER = "trained.json"  # a trained edit's record, written last (steps/optimal.py)


def save_snapshots(edit, tlog, edit_dir: Path) -> list[int]:
    """Write each snapshot of `tlog` (TrainLog.snapshots) as a LoRAEdit beside the trained `edit`."""
    from locaudit.edit.lora import LoRAEdit

    steps = sorted(tlog.snapshots)
    for s in steps:
        a, b = tlog.snapshots[s]
        LoRAEdit(a, b, edit.heads, edit.reparam, {**edit.meta, "dose_step": int(s)}).save(
            Path(edit_dir) / DOSE_DIR / f"step-{s}")
    return steps


def dose_metrics(ctx: RunContext) -> list[str]:
    """The evaluate_edit metrics of a dose point: those the primary metric needs, and KL."""
    from locaudit.study.trials import selection_metrics

    return sorted(set(selection_metrics(ctx.spec)) | {"kl"})


def final_step(trained: dict) -> int | None:
    """The trained edit's place on its path: the best-validation step, else the steps run."""
    best = trained.get("best") or {}
    return best.get("step", trained.get("steps"))


def dose_points(edit_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every saved snapshot of a trained edit, in step order."""
    folders = sorted((Path(edit_dir) / DOSE_DIR).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return [(int(f.name.split("-")[1]), f) for f in folders]


def evaluate_dose(ctx: RunContext, t: Trial, edit, edit_dir: Path, metrics: dict, out_dir: Path,
                  scored: dict[int, dict] | None = None) -> dict:
    """Score the snapshots of trial `t` (and the trained `edit` where its own evaluation lacks a dose metric);
    write out_dir/dose.json; returns it. `scored`: {step: metrics} of snapshots already scored (together with
    other trials' snapshots, into out_dir/dose/step-N), not scored again."""
    from locaudit.edit.lora import LoRAEdit
    from locaudit.study.steps.evaluation import score_split

    p = t.as_(OptimalTrial)
    ev = p.evaluation
    wanted = dose_metrics(ctx)
    trained = json.loads((Path(edit_dir) / TRAINED_MARKER).read_text(encoding="utf-8"))
    last = final_step(trained)
    points = []
    for step, f in dose_points(edit_dir):
        if step == last:
            continue  # the same state as the trained edit, scored below
        d = out_dir / DOSE_DIR / f.name
        m = (scored or {}).get(step)
        if m is None:
            m = score_split(ctx, ev, LoRAEdit.load(f), ev.split, ev.max_questions, wanted, d)
        points.append({"step": step, "final": False, "eval": ctx.rel(d), "metrics": m})
    if set(wanted) <= set(ev.metrics):  # the trained edit's own evaluation has every dose metric
        final = {"eval": ctx.rel(out_dir / "eval"), "metrics": {k: v for k, v in metrics.items()}}
    else:
        d = out_dir / DOSE_DIR / "final"
        final = {"eval": ctx.rel(d), "metrics": score_split(ctx, ev, edit, ev.split, ev.max_questions, wanted, d)}
    points.append({"step": last, "final": True, **final})
    points.sort(key=lambda x: (x["step"] is None, x["step"] or 0, x["final"]))
    out = {"trial": t.key, "metrics": wanted, "dose_steps": p.dose_steps, "points": points}
    write_json_atomic(out_dir / DOSE_FILE, out)
    return out
