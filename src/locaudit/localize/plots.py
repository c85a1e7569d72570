"""Figures of localization results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os

import torch

from locaudit.io import atomic_path


def plot_probe_heatmap(val_acc: torch.Tensor, path: str | os.PathLike, title: str = "probe validation accuracy",
                       mark_top: int = 0, dpi: int = 120) -> None:
    """Save a layers x heads heatmap of Float[Tensor, "layer head"] accuracies to `path` (PNG).

    `mark_top` > 0 outlines the best heads so a reader sees at once which ones a top-K choice takes.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    acc = val_acc.detach().float().cpu().numpy()
    L, H = acc.shape
    fig, ax = plt.subplots(figsize=(min(2.0 + 0.35 * H, 16), min(1.5 + 0.25 * L, 14)))
    im = ax.imshow(acc, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title + (f"\n(outlined: best {mark_top})" if mark_top > 0 else ""), fontsize=10)
    step_h = max(1, H // 16)
    step_l = max(1, L // 20)
    ax.set_xticks(range(0, H, step_h))
    ax.set_yticks(range(0, L, step_l))
    cbar = fig.colorbar(im, ax=ax)
    cbar.set_label("validation accuracy")
    if mark_top > 0:
        flat = sorted(((-acc[l, h], l, h) for l in range(L) for h in range(H)))[:mark_top]
        for _, l, h in flat:
            ax.add_patch(plt.Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def plot_head_heatmap(values: torch.Tensor, path: str | os.PathLike, title: str = "", label: str = "",
                      mark=(), diverging: bool = False, dpi: int = 120) -> None:
    """Save a layers x heads heatmap of Float[Tensor, "layer head"] values (NaN cells blank) to `path` (PNG).

    `mark`: (layer, head) cells to outline (e.g. a localizer's top-K). `diverging` centres a red/blue
    colour map on 0 (signed effects); otherwise viridis.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    v = values.detach().double().cpu().numpy()
    L, H = v.shape
    fig, ax = plt.subplots(figsize=(min(2.0 + 0.35 * H, 16), min(1.5 + 0.25 * L, 14)))
    finite = v[np.isfinite(v)]
    kw = {}
    if diverging:
        m = float(np.abs(finite).max()) if finite.size else 1.0
        kw = dict(cmap="RdBu_r", vmin=-(m or 1.0), vmax=(m or 1.0))
    else:
        kw = dict(cmap="viridis")
    im = ax.imshow(np.ma.masked_invalid(v), aspect="auto", origin="lower", interpolation="nearest", **kw)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    mark = list(mark)
    ax.set_title(title + (f"\n(outlined: best {len(mark)})" if mark else ""), fontsize=10)
    ax.set_xticks(range(0, H, max(1, H // 16)))
    ax.set_yticks(range(0, L, max(1, L // 20)))
    cbar = fig.colorbar(im, ax=ax)
    if label:
        cbar.set_label(label)
    for l, h in mark:
        ax.add_patch(plt.Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.2))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
