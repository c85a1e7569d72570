"""Batched multi-edit training: E independent edits (e.g. random head sets, single heads) per pass.

A group of edits shares each forward pass (the batch replicated once per edit), but runs from the lowest
edited layer of the group, whereas an edit trained alone runs only the layers above its own (frozen
prefix). So batching pays where edits start at about the same layer and costs where they do not (8
single heads spread over 30 layers run 1.5x slower as one group than one by one). `plan_groups` sorts
the edits by lowest layer and splits them into runs of at most `config.max_parallel` edits that minimise
the estimated cost (layers run x copies, a copy in a group costing `config.group_copy_cost` of a run of
its own); results come back in the input order. Reference log-probs and prefix states are shared by all
groups (edit/reference.py, edit/prefix.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Collection, Sequence

from locaudit.data.prompts import PromptFormat
from locaudit.data.types import PreferencePair
from locaudit.edit.config import TrainConfig
from locaudit.edit.lora import LoRAEdit
from locaudit.edit.resume import PassCheckpoint
from locaudit.edit.train import TrainLog, make_edit, prepare, train_stack
from locaudit.models.surgery import prefix_supported
from locaudit.heads import HeadSet
from locaudit.models.loading import LoadedModel


def train_edits(lm: LoadedModel, heads_list: Sequence[HeadSet], train_pairs: Sequence[PreferencePair],
                val_pairs: Sequence[PreferencePair] | None = None, fmt: PromptFormat | None = None,
                config: TrainConfig | dict | None = None, lrs: Sequence[float] | None = None,
                on_done: Callable[[int, LoRAEdit, TrainLog], None] | None = None,
                resume_dir: str | Path | None = None, skip: Collection[int] = (),
                **overrides) -> list[tuple[LoRAEdit, TrainLog] | None]:
    """Train one edit per head set, in groups of at most `config.max_parallel` that share each pass
    (`plan_groups`); same result as separate `train_edit` runs with the same config. `lrs` overrides the
    per-edit learning rates. `on_done(i, edit, log)` is called for edit i (its index in `heads_list`) as soon as
    its group has trained, before the next group starts: a caller saves it there, so a long run killed part way
    loses at most the group in training; with `resume_dir`, each group also checkpoints its pass there
    (edit/resume.py), so that it loses at most the steps since its last early-stopping check. A group's checkpoint
    is removed once `on_done` has returned for all its edits. `skip`: indices of edits an earlier attempt trained
    already; they are planned with the rest, so that every attempt groups the edits alike (the planner breaks ties
    by position, and a pass's checkpoint is found again only by the same group), but not trained (None in the
    result)."""
    p = prepare(lm, heads_list, train_pairs, val_pairs, fmt, config, lrs, **overrides)
    cfg, fmt, lrs, enc_train, enc_val = p.config, p.fmt, p.lrs, p.enc_train, p.enc_val
    heads_list = list(heads_list)
    L = lm.sites.n_layers
    order = sorted(range(len(heads_list)), key=lambda i: (min(heads_list[i].layers), i))
    prefix = cfg.frozen_prefix and prefix_supported(lm)
    starts = [min(heads_list[i].layers) if prefix else 0 for i in order]
    copy_cost = cfg.group_copy_cost if cfg.group_copy_cost is not None else (0.85 if lm.device.type == "cpu" else 0.35)
    out: list[tuple[LoRAEdit, TrainLog] | None] = [None] * len(heads_list)
    skip = set(skip)
    for g, end in plan_groups(starts, L, cfg.max_parallel, copy_cost):
        group = [i for i in order[g: end] if i not in skip]
        if not group:
            continue
        hs = [heads_list[i] for i in group]
        label = hs[0].name if len(hs) == 1 else f"edits {g + 1}-{g + len(hs)} of {len(order)}"
        ckpt = PassCheckpoint(resume_dir) if resume_dir is not None else None
        stack, logs = train_stack(lm, hs, enc_train, enc_val, cfg, [lrs[i] for i in group], label, p.precision, ckpt)
        for e, i in enumerate(group):
            out[i] = (make_edit(lm, stack, e, heads_list[i], cfg, lrs[i], fmt, logs[e], enc_train, enc_val, p.precision),
                      logs[e])
            if on_done is not None:
                on_done(i, *out[i])
        if ckpt is not None:
            ckpt.clear()
    return out  # type: ignore[return-value]


def plan_groups(starts: Sequence[int], n_layers: int, max_parallel: int, copy_cost: float) -> list[tuple[int, int]]:
    """Split edits sorted by the first layer they run (`starts`, ascending) into contiguous groups
    [(begin, end), ...] of at most `max_parallel` edits, minimising the estimated cost: an edit alone runs
    n_layers - start layers; a group of k runs k copies from its lowest start, each copy costing
    `copy_cost` (< 1: batching gain) of a run of its own. Exact, by dynamic programming over the cut points."""
    if any(b < a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"plan_groups: starts must be ascending, got {list(starts)}")
    n = len(starts)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_parallel), j):
            k = j - i
            cost = best[i] + (n_layers - starts[i]) * (1.0 if k == 1 else k * copy_cost)
            if cost < best[j] - 1e-9:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append((cut[j], j))
        j = cut[j]
    return groups[::-1]
