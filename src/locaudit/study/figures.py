"""The paper's figures from a study's results (matplotlib, Agg backend).

Each function takes the results table (analysis.results_frame) and writes one PNG, or returns None
when the trials it needs are not finished yet, so a half-finished study still gets every figure it can.
Colours: random draws grey, the probe's top-K heads red, single heads blue, all heads green, the
unedited model black.

Sizes are for a report page 800-1400 px wide: at DPI, a figure is at most MAX_WIDTH_IN inches (1020 px) wide, so
that at 800 px (768 px of content; 753 beside a scrollbar) it is shown at 0.73 of its size or more and its 10 pt
tick labels (16.7 px at DPI) stay at least 12 px tall (tests/unit/test_report_layout.py measures this in a browser). Axes of a metric with a known range
(shares in [0, 1]; KL and CE >= 0) never extend past it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from locaudit.io import atomic_path
from locaudit.study.analysis import (METHOD_LABEL, METHODS, by_localizer, best_per_localizer, higher_is_better,
                                     metric_label, primary_metric)

COLORS = {"random": "#8c8c8c", "top": "#d62728", "single": "#1f77b4", "all": "#2ca02c", "none": "#000000"}
GROUP_LABEL = {"random": "random heads", "top": "probe top-K", "single": "single heads", "all": "all heads",
               "none": "unedited"}


DPI = 120
MAX_WIDTH_IN = 8.5  # 1020 px at DPI


def agg_pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = DPI) -> Path:
    plt = agg_pyplot()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return Path(path)


SHARE_METRICS = ("true", "info", "true_info", "true_info_per_q", "true_prob", "info_prob", "true_info_prob", "mc0",
                 "mc1", "mc2", "ab", "pref_acc")
NON_NEGATIVE_METRICS = ("kl", "ce", "kl_answers", "ce_answers")


def metric_range(metric: str | None) -> tuple[float | None, float | None]:
    """The values a metric can take: (0, 1) for shares and accuracies, (0, None) for KL and CE, else unbounded."""
    m = (metric or "").lower()
    if m in SHARE_METRICS or m.endswith(("_acc", "_share", "_rate")):
        return 0.0, 1.0
    if m in NON_NEGATIVE_METRICS:
        return 0.0, None
    return None, None


def _clip_axis(ax, metric: str | None, axis: str = "x") -> None:
    """Keep an axis inside the metric's range (a histogram of identical shares would otherwise span
    [v - 0.5, v + 0.5]): the limits are cut to the range, with a 2% margin for markers at its ends."""
    lo, hi = metric_range(metric)
    if lo is None and hi is None:
        return
    get, set_ = (ax.get_xlim, ax.set_xlim) if axis == "x" else (ax.get_ylim, ax.set_ylim)
    a, b = get()
    pad = 0.02 * ((hi if hi is not None else b) - (lo if lo is not None else a))
    a2 = a if lo is None else max(a, lo - pad)
    b2 = b if hi is None else min(b, hi + pad)
    if b2 > a2:
        set_(a2, b2)


def _narrow_range(ax, values, metric: str | None) -> None:
    """A histogram whose values are (nearly) all equal: a narrow x range around them, inside the metric's range,
    instead of matplotlib's +-0.5."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if v.size == 0:
        return
    lo_v, hi_v = float(v.min()), float(v.max())
    lo, hi = metric_range(metric)
    width = (hi - lo) if lo is not None and hi is not None else max(abs(lo_v), abs(hi_v), 1.0)
    if hi_v - lo_v <= 1e-9 * width:
        pad = 0.05 * width
        a, b = lo_v - pad, hi_v + pad
        if lo is not None:
            a = max(a, lo - 0.01 * width)
        if hi is not None:
            b = min(b, hi + 0.01 * width)
        ax.set_xlim(a, b)


OTHER_CANDIDATE_COLORS = ("#7b3294", "#e08214", "#1b9e77", "#666666")  # candidates after the probe's


def _baseline(df: pd.DataFrame, metric: str) -> float | None:
    b = df[df["kind"] == "baseline"]
    if metric in b.columns and b[metric].notna().any():
        return float(b[metric].mean())
    return None


def hist_random_vs_top(df: pd.DataFrame, method: str, path: str | os.PathLike, metric: str | None = None,
                       top_k: int | None = None) -> Path | None:
    """Histogram of the metric over random K-head draws (best grid point each), with the top-K heads,
    all heads and the unedited model marked (the paper's hist_iti / hist_ipo)."""
    metric = metric or primary_metric(df)
    if metric is None:
        return None
    best = best_per_localizer(df, method, metric)
    rand, _ = by_localizer(best, metric, "random")
    top, _ = by_localizer(best, metric, "top")
    if not rand and not top:
        return None
    plt = agg_pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    if rand:
        bins = min(max(5, len(rand) // 2), 20)
        ax.hist(rand, bins=bins, color=COLORS["random"], alpha=0.8, label=f"random {top_k or 'K'}-head draws (n={len(rand)})")
    ymax = ax.get_ylim()[1] if rand else 1.0
    k = top_k or "K"
    # one line per candidate location (the probe's top-K first, then e.g. patching:top8), never their mean
    names = by_localizer(best, metric, "top")[1]
    order = sorted(range(len(top)), key=lambda i: (":" in names[i], names[i]))
    for n, i in enumerate(order):
        who = names[i].split(":", 1)[0] if ":" in names[i] else "probe"
        color = COLORS["top"] if n == 0 else OTHER_CANDIDATE_COLORS[(n - 1) % len(OTHER_CANDIDATE_COLORS)]
        ax.axvline(float(top[i]), color=color, linestyle="-" if n == 0 else "-.", linewidth=2,
                   label=f"{who} top-{k} ({top[i]:.3f})")
    full = by_localizer(best, metric, "all")[0]
    if full:
        ax.axvline(float(np.mean(full)), color=COLORS["all"], linestyle="--", linewidth=2,
                   label=f"{GROUP_LABEL['all']} ({np.mean(full):.3f})")
    base = _baseline(df, metric)
    if base is not None:
        ax.axvline(base, color=COLORS["none"], linestyle=":", linewidth=1.5, label=f"unedited ({base:.3f})")
    ax.set_ylim(0, max(ymax, 1.0))
    ax.yaxis.get_major_locator().set_params(integer=True)  # counts of draws
    _narrow_range(ax, [*rand, *top, *full, *([base] if base is not None else [])], metric)
    _clip_axis(ax, metric, "x")
    ax.set_xlabel(f"{metric_label(metric)} (grid point chosen per location)")
    ax.set_ylabel("random draws")
    ax.set_title(f"{METHOD_LABEL[method]}: {metric_label(metric)}, random vs localized heads")
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def _scatter(df: pd.DataFrame, path: str | os.PathLike, x: str, y: str, title: str) -> Path | None:
    have = [m for m in METHODS if not df[(df["kind"] == m)].empty]
    if x not in df.columns or y not in df.columns or not have:
        return None
    pts = df[df[x].notna() & df[y].notna()]
    if pts.empty:
        return None
    plt = agg_pyplot()
    # panels side by side, the figure at most MAX_WIDTH_IN wide (legible ticks at 800 px)
    w = min(4.25 * len(have), MAX_WIDTH_IN)
    fig, axes = plt.subplots(1, len(have), figsize=(w, 3.7), squeeze=False)
    base = pts[pts["kind"] == "baseline"]
    for ax, method in zip(axes[0], have):
        sub = pts[pts["kind"] == method]
        for group in ("random", "single", "all", "top"):
            g = sub[sub["group"] == group]
            if not g.empty:
                ax.scatter(g[x], g[y], s=28 if group != "top" else 46, c=COLORS[group], alpha=0.75 if group == "random" else 0.95,
                           label=GROUP_LABEL[group], edgecolors="none", marker="o" if group != "all" else "s")
        if not base.empty:
            ax.scatter(base[x], base[y], s=90, c=COLORS["none"], marker="*", label="unedited")
        ax.set_xlabel(metric_label(x))
        ax.set_ylabel(metric_label(y))
        _clip_axis(ax, x, "x")
        _clip_axis(ax, y, "y")
        ax.set_title(f"{METHOD_LABEL[method]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title + " (every grid point)", fontsize=10)
    return save_figure(fig, path)


def truth_info_scatter(df: pd.DataFrame, path: str | os.PathLike) -> Path | None:
    """True vs Info per trial (the paper's iti_truth_info)."""
    return _scatter(df, path, "info", "true", "True vs Info")


def kl_mc_scatter(df: pd.DataFrame, path: str | os.PathLike) -> Path | None:
    """KL to the unedited model vs MC accuracy (the paper's iti_kl_mc)."""
    mc = next((m for m in ("mc2", "mc1", "mc0") if m in df.columns and df[m].notna().any()), None)
    if mc is None or "kl" not in df.columns:
        return None
    return _scatter(df, path, "kl", mc, f"KL vs {metric_label(mc)}")


def probe_heatmap(val_acc: np.ndarray, path: str | os.PathLike, top_k: int,
                  highlight: list[tuple[int, int]] | None = None) -> Path:
    """Per-head probe validation accuracy (layers x heads); top-K outlined in red, `highlight` (e.g. single
    heads that match full alignment) circled in blue."""
    plt = agg_pyplot()
    acc = np.asarray(val_acc, dtype=float)
    L, H = acc.shape
    fig, ax = plt.subplots(figsize=(min(2.5 + 0.35 * H, MAX_WIDTH_IN), min(1.8 + 0.22 * L, 12)))
    im = ax.imshow(acc, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax).set_label("validation accuracy")
    order = sorted(((-acc[l, h], l, h) for l in range(L) for h in range(H)))[:top_k]
    for _, l, h in order:
        ax.add_patch(plt.Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, edgecolor=COLORS["top"], linewidth=1.4))
    for l, h in highlight or []:
        ax.scatter([h], [l], s=60, facecolors="none", edgecolors="#00bfff", linewidths=1.6)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, H, max(1, H // 16)))
    ax.set_yticks(range(0, L, max(1, L // 20)))
    t = f"probe validation accuracy\nred: top-{top_k}"
    ax.set_title(t + ("; blue: single heads matching\nfull alignment (optimal edit)" if highlight else ""), fontsize=9)
    return save_figure(fig, path)


def single_vs_full(df: pd.DataFrame, singles: pd.DataFrame, method: str, path: str | os.PathLike,
                   top_k: int | None = None) -> Path | None:
    """Each single head's best score, sorted, against full alignment, the top-K heads, the random draws
    and the unedited model (the paper's hist_ipo_1 / single_vs_top)."""
    s = singles[singles["method"] == method] if not singles.empty else singles
    if s.empty:
        return None
    metric = s["metric"].iloc[0]
    s = s.sort_values("value", ascending=not higher_is_better(metric))
    best = best_per_localizer(df, method, metric)
    plt = agg_pyplot()
    fig, ax = plt.subplots(figsize=(min(max(5.0, 0.32 * len(s) + 2.5), MAX_WIDTH_IN), 4.0))
    xs = np.arange(len(s))
    base = _baseline(df, metric)
    if base is not None:  # lollipops from the unedited model's value: the gain each head's edit buys
        ax.vlines(xs, base, s["value"], color=COLORS["single"], alpha=0.6, linewidth=2)
    ax.scatter(xs, s["value"], color=COLORS["single"], s=36, zorder=3, label="single head")
    every = max(1, int(np.ceil(len(s) / 40)))  # at most about 40 labels across MAX_WIDTH_IN
    names = [h or l for h, l in zip(s["head"], s["localizer"])]
    ax.set_xticks(xs[::every])
    ax.set_xticklabels(names[::every], rotation=70, fontsize=7)
    full = by_localizer(best, metric, "all")[0]
    top = by_localizer(best, metric, "top")[0]
    rand = by_localizer(best, metric, "random")[0]
    if full:
        ax.axhline(np.mean(full), color=COLORS["all"], linestyle="--", linewidth=2, label=f"all heads ({np.mean(full):.3f})")
    if top:
        ax.axhline(np.mean(top), color=COLORS["top"], linewidth=1.5, label=f"probe top-{top_k or 'K'} ({np.mean(top):.3f})")
    if rand:
        ax.axhspan(np.min(rand), np.max(rand), color=COLORS["random"], alpha=0.2, label="random draws (range)")
    if base is not None:
        ax.axhline(base, color=COLORS["none"], linestyle=":", linewidth=1.5, label=f"unedited ({base:.3f})")
    _clip_axis(ax, metric, "y")
    ax.set_ylabel(f"{metric_label(metric)} (chosen grid point)")
    ax.set_title(f"{METHOD_LABEL[method]}: single heads vs full alignment", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure(fig, path)


def grid_curves(df: pd.DataFrame, method: str, path: str | os.PathLike, metric: str | None = None) -> Path | None:
    """The metric over the edit's grid (alpha for ITI, tau for optimal edits), one line per location."""
    metric = metric or primary_metric(df)
    sub = df[(df["kind"] == method)]
    if metric is None or sub.empty or metric not in sub.columns:
        return None
    xcol = "alpha" if method == "iti" else "tau"
    sub = sub[sub[metric].notna() & sub[xcol].notna()]
    if sub[xcol].nunique() < 2:
        return None
    plt = agg_pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    seen = set()
    for group in ("random", "single", "all", "top"):
        for loc, g in sub[sub["group"] == group].groupby("localizer"):
            g = g.groupby(xcol)[metric].max().sort_index()  # best lr per tau
            ax.plot(g.index, g.values, color=COLORS[group], alpha=0.5 if group in ("random", "single") else 1.0,
                    linewidth=1 if group in ("random", "single") else 2.2, marker="o", markersize=3,
                    label=GROUP_LABEL[group] if group not in seen else None)
            seen.add(group)
    base = _baseline(df, metric)
    if base is not None:
        ax.axhline(base, color=COLORS["none"], linestyle=":", label="unedited")
    _clip_axis(ax, metric, "y")
    ax.set_xlabel(xcol)
    ax.set_ylabel(metric_label(metric))
    ax.set_title(f"{METHOD_LABEL[method]}: {metric_label(metric)} over {xcol}", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
