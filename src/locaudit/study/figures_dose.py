"""The matched-KL figure: each optimal edit's gain on the primary metric against its KL on generic text, along its
training path (optimal.dose_steps), for the random draws, the candidate, single heads and all heads, with the KL
budget at which study/matched_kl.py compares them. Colours as study/figures.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from locaudit.study.figures import COLORS, GROUP_LABEL, MAX_WIDTH_IN, agg_pyplot, save_figure
from locaudit.study.matched_kl import DoseCurve

_ORDER = {"random": 0, "single": 1, "all": 2, "top": 3}  # the candidate drawn last, on top


def gain_vs_kl(curves: list[DoseCurve], res: dict, metric: str, path: str | os.PathLike) -> Path | None:
    """Gain vs KL paths (from the unedited model at (0, 0)), the budget as a dashed line and each location's
    interpolated gain there as a dot; None without curves."""
    if not curves:
        return None
    plt = agg_pyplot()
    fig, ax = plt.subplots(figsize=(min(6.5, MAX_WIDTH_IN), 4.2))
    seen: set[str] = set()
    for c in sorted(curves, key=lambda c: _ORDER.get(c.group, 1)):
        x = np.concatenate([[0.0], c.kl])
        y = np.concatenate([[0.0], c.gain.mean(axis=1)])
        top = c.group == "top"
        ax.plot(x, y, "-o", color=COLORS.get(c.group, "#555555"), lw=2.0 if top else 0.9, ms=3 if top else 2,
                alpha=1.0 if top or c.group == "all" else 0.55, zorder=3 if top else 2,
                label=GROUP_LABEL.get(c.group, c.group) if c.group not in seen else None)
        seen.add(c.group)
    budget = res.get("budget", float("nan"))
    if np.isfinite(budget):
        ax.axvline(budget, color="#444444", ls="--", lw=1, label=f"KL budget {budget:.3g}")
        for loc in res.get("locations", []):
            ax.scatter([budget], [loc["gain"]], s=18 if loc["group"] != "top" else 40,
                       color=COLORS.get(loc["group"], "#555555"), edgecolors="black", linewidths=0.4, zorder=4)
    ax.axhline(0.0, color=COLORS["none"], lw=0.6)
    ax.set_xlim(left=0.0)
    ax.set_xlabel("KL(unedited || edited) on generic text")
    ax.set_ylabel(f"gain in {metric} over the unedited model")
    ax.set_title(f"Matched collateral damage: {metric} gain vs KL along training", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)
