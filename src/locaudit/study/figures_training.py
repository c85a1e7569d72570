"""Learning curves of optimal edits: validation loss (the training objective on held-out pairs) against optimizer
steps, one line per edit, coloured by localizer group, the state kept (the best under early stopping) as a dot.

The curve is read from each trained edit's meta.json ("curve": edit.train.TrainLog): the early-stopping
evaluations where there are any (TrainConfig.eval_every), else the unedited model at step 0 and the end of every
epoch. Colours as study/figures.py. `training_status` tells, per edit and per localizer group, whether early stopping
ended the edit's training (its validation loss plateaued) or the step cap did (it may still have been improving).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from locaudit.study.figures import COLORS, GROUP_LABEL, MAX_WIDTH_IN, agg_pyplot, save_figure


def curve_points(curve: dict) -> tuple[list[float], list[float], tuple[float, float] | None]:
    """(steps, validation losses, (step, loss) of the state kept or None) of one TrainLog dict."""
    evals = curve.get("evals") or []
    if evals:
        xs = [float(e["step"]) for e in evals if "val_loss" in e]
        ys = [float(e["val_loss"]) for e in evals if "val_loss" in e]
        best = curve.get("best") or {}
        kept = (float(best["step"]), float(best["val_loss"])) if "step" in best and "val_loss" in best else None
        return xs, ys, kept
    epochs = [e for e in curve.get("epochs") or [] if "val_loss" in e]
    if not epochs:
        return [], [], None
    per_epoch = len(curve.get("steps") or []) / max(1, len(curve.get("epochs") or []))
    xs = [float(e["epoch"]) * per_epoch for e in epochs]
    ys = [float(e["val_loss"]) for e in epochs]
    before = (curve.get("before") or {}).get("val_loss")
    if before is not None:
        xs, ys = [0.0] + xs, [float(before)] + ys
    return xs, ys, (xs[-1], ys[-1])


def read_curves(run_dir: Path, rows: list[dict]) -> list[tuple[str, str, dict]]:
    """(localizer, group, TrainLog dict) of every finished optimal trial whose edit folder has a curve."""
    from locaudit.study.trials import Trial

    out = []
    for r in rows:
        edit = (r.get("artifacts") or {}).get("edit")
        if r.get("kind") != "optimal" or r.get("status") != "done" or not edit:
            continue
        try:
            meta = json.loads((Path(run_dir) / edit / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        t = Trial.from_dict({**(r.get("spec") or {}), "key": r["key"], "kind": "optimal",
                             "content": (r.get("spec") or {}).get("content", {})})
        lo = t.localizer
        if meta.get("curve"):
            out.append((lo.name if lo else r["key"], t.group, meta["curve"]))
    return out


def learning_curves(curves: list[tuple[str, str, dict]], path: str | os.PathLike) -> Path | None:
    """One line per edit (validation loss vs step); None when no edit has a validation curve."""
    drawn = [(name, group, *curve_points(c)) for name, group, c in curves]
    drawn = [d for d in drawn if len(d[2]) > 1]
    if not drawn:
        return None
    plt = agg_pyplot()
    fig, ax = plt.subplots(figsize=(min(6.5, MAX_WIDTH_IN), 4.0))
    seen: set[str] = set()
    for name, group, xs, ys, kept in sorted(drawn, key=lambda d: d[1] == "top"):
        col = COLORS.get(group, "#555555")
        ax.plot(xs, ys, "-", color=col, lw=1.8 if group == "top" else 0.8, alpha=1.0 if group == "top" else 0.6,
                label=GROUP_LABEL.get(group, group) if group not in seen else None)
        seen.add(group)
        if kept is not None:
            ax.scatter([kept[0]], [kept[1]], s=14, color=col, edgecolors="black", linewidths=0.4, zorder=3)
    ax.ticklabel_format(axis="y", useOffset=False)  # losses near 25 (IPO at tau 0.1) differ in the 3rd decimal
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss")
    ax.set_title("Optimal edits: validation loss during training (dot: the state kept)", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def training_status(curves: list[tuple[str, str, dict]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per edit trained with early stopping, one per localizer group) from read_curves' output.

    Per edit: `plateaued` (patience ran out: its validation loss stopped improving), else it trained to the step
    cap; `best_at_last_check` (the state kept is the last one checked: still improving when training ended);
    `kept_unedited` (no check beat the unedited model, step 0: the edit kept is the identity, and its gain says
    only that this location's training found nothing on validation);
    `steps` (where its training ended), `best_step`, `val_loss_before` and `val_loss_kept`. Per group: the edit
    count, how many plateaued, how many ended at the cap still improving, how many kept the unedited state, and
    the range of best steps. An
    edit that ends at the cap still improving is less near its optimum than one that plateaued: where groups
    differ in that, so may their gains, for a reason that is not the location."""
    rows = []
    for name, group, c in curves:
        evals = [e for e in c.get("evals") or [] if "val_loss" in e]
        if not evals:
            continue
        best = c.get("best") or {}
        stopped = c.get("stopped_step")
        last = int(evals[-1]["step"])
        rows.append({"localizer": name, "group": group, "plateaued": stopped is not None,
                     "steps": int(stopped if stopped is not None else (c.get("steps_run") or last)),
                     "best_step": int(best.get("step", last)), "best_at_last_check": int(best.get("step", -1)) == last,
                     "kept_unedited": bool(best) and int(best.get("step", -1)) == 0,
                     "val_loss_before": (c.get("before") or {}).get("val_loss", evals[0]["val_loss"]),
                     "val_loss_kept": best.get("val_loss")})
    per_edit = pd.DataFrame(rows, columns=["localizer", "group", "plateaued", "steps", "best_step",
                                           "best_at_last_check", "kept_unedited", "val_loss_before", "val_loss_kept"])
    if per_edit.empty:
        return per_edit, pd.DataFrame()
    g = per_edit.assign(at_cap_improving=~per_edit["plateaued"] & per_edit["best_at_last_check"]).groupby("group", sort=False)
    per_group = pd.DataFrame({
        "edits": g.size(), "plateaued": g["plateaued"].sum(), "at_cap_improving": g["at_cap_improving"].sum(),
        "kept_unedited": g["kept_unedited"].sum(),
        "best_step_median": g["best_step"].median(), "best_step_min": g["best_step"].min(),
        "best_step_max": g["best_step"].max(), "val_loss_kept_median": g["val_loss_kept"].median(),
    }).reset_index()
    for c in ("edits", "plateaued", "at_cap_improving", "kept_unedited", "best_step_min", "best_step_max"):
        per_group[c] = per_group[c].astype(int)
    return per_edit, per_group


def status_line(per_group: pd.DataFrame) -> str | None:
    """One sentence on how the groups' training ended (None without early stopping)."""
    if per_group.empty:
        return None
    parts = [f"{GROUP_LABEL.get(r.group, r.group)}: {r.plateaued} of {r.edits} plateaued"
             + (f", {r.at_cap_improving} still improving at the step cap" if r.at_cap_improving else "")
             + (f", {r.kept_unedited} kept the unedited state (no check beat it on validation)" if r.kept_unedited else "")
             + f" (best steps {r.best_step_min}-{r.best_step_max})" for r in per_group.itertuples()]
    return "Training ended by early stopping or by the step cap: " + "; ".join(parts) + "."
