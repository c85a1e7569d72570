"""Batched multi-edit training: E independent edits (e.g. random head sets, single heads) per pass.

Edits are sorted by their lowest layer and trained in groups of `config.max_parallel`, so each group's
frozen prefix reaches as high as possible; results come back in the input order. Reference log-probs
and prefix states are shared by all groups (edit/reference.py, edit/prefix.py).
"""

from __future__ import annotations

from typing import Sequence

from locaudit.data.prompts import PromptFormat
from locaudit.data.types import PreferencePair
from locaudit.edit.config import TrainConfig
from locaudit.edit.encoded import encode_pairs
from locaudit.edit.lora import LoRAEdit
from locaudit.edit.train import TrainLog, make_edit, resolve_config, train_stack
from locaudit.errors import ConfigError
from locaudit.heads import HeadSet
from locaudit.models.loading import LoadedModel


def train_edits(lm: LoadedModel, heads_list: Sequence[HeadSet], train_pairs: Sequence[PreferencePair],
                val_pairs: Sequence[PreferencePair] | None = None, fmt: PromptFormat | None = None,
                config: TrainConfig | dict | None = None, lrs: Sequence[float] | None = None,
                **overrides) -> list[tuple[LoRAEdit, TrainLog]]:
    """Train one edit per head set, `config.max_parallel` at a time in one pass; same result as separate
    `train_edit` runs with the same config. `lrs` overrides the per-edit learning rates."""
    cfg = resolve_config(config, **overrides)
    fmt = fmt or PromptFormat("plain")
    heads_list = list(heads_list)
    if not heads_list:
        raise ConfigError("train_edits: no head sets given")
    L, H = lm.sites.n_layers, lm.sites.n_heads
    if lrs is None:
        lrs = [cfg.resolved_lr(len(hs), L * H) for hs in heads_list]
    elif len(lrs) != len(heads_list):
        raise ConfigError(f"train_edits: {len(lrs)} learning rates for {len(heads_list)} head sets")
    enc_train = encode_pairs(lm.tokenizer, train_pairs, fmt, cfg.max_length, lm.fingerprint)
    enc_val = encode_pairs(lm.tokenizer, val_pairs, fmt, cfg.max_length, lm.fingerprint) if val_pairs else None
    order = sorted(range(len(heads_list)), key=lambda i: (min(heads_list[i].layers), i))
    out: list[tuple[LoRAEdit, TrainLog] | None] = [None] * len(heads_list)
    for g in range(0, len(order), cfg.max_parallel):
        group = order[g: g + cfg.max_parallel]
        hs = [heads_list[i] for i in group]
        label = hs[0].name if len(hs) == 1 else f"edits {g + 1}-{g + len(hs)} of {len(order)}"
        stack, logs = train_stack(lm, hs, enc_train, enc_val, cfg, [lrs[i] for i in group], label)
        for e, i in enumerate(group):
            out[i] = (make_edit(lm, stack, e, heads_list[i], cfg, lrs[i], fmt, logs[e], enc_train, enc_val), logs[e])
    return out  # type: ignore[return-value]
