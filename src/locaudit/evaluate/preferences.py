"""Held-out preferences: does the edited model prefer the chosen answer of unseen pairs?

Per pair, each side's log-prob is AVERAGED over its completion tokens (the IPO/TRL convention the
edits are trained with); accuracy = share of pairs with avg logp(chosen) > avg logp(rejected), margin =
mean of the difference. Pairs of one question share answers, so SEs are cluster-robust by question.
Each distinct (question, answer) is scored once in one batched pass.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence


from locaudit.data.prompts import PromptFormat
from locaudit.data.types import PreferencePair
from locaudit.edit.base import Edit
from locaudit.models.batching import add_special_tokens_for
from locaudit.evaluate.view import edited
from locaudit.models.loading import LoadedModel
from locaudit.models.precision import ResolvedPrecision, require_resolved
from locaudit.models.scoring import score_completions


def clustered_mean_se(values: Sequence[float], groups: Sequence[str]) -> tuple[float, float | None]:
    """Mean of `values` and its cluster-robust SE with clusters `groups` (None with fewer than 2 clusters)."""
    n = len(values)
    if n == 0:
        return float("nan"), None
    m = sum(values) / n
    per: dict[str, float] = defaultdict(float)
    for v, g in zip(values, groups):
        per[g] += v - m
    G = len(per)
    if G < 2:
        return m, None
    return m, math.sqrt(G / (G - 1) * sum(r * r for r in per.values())) / n


@dataclass
class PreferenceResult:
    accuracy: float
    accuracy_se: float | None
    margin: float
    margin_se: float | None
    n_pairs: int
    chosen: list[float]  # avg log-prob per pair
    rejected: list[float]

    def summary(self) -> dict:
        return {"pref_acc": self.accuracy, "pref_acc_se": self.accuracy_se, "pref_margin": self.margin,
                "pref_margin_se": self.margin_se, "n_pairs": self.n_pairs}


def score_preferences(
    lm: LoadedModel,
    edit: Edit | None,
    pairs: Sequence[PreferencePair],
    fmt: PromptFormat = PromptFormat("plain"),
    batch_size: int = 32,
    max_length: int = 512,
    *, precision: ResolvedPrecision,
) -> PreferenceResult:
    """Accuracy and mean margin of per-token-averaged completion log-probs, with `edit` applied."""
    tok = lm.tokenizer
    index: dict[tuple[str, str], int] = {}
    prompts, completions = [], []
    for p in pairs:
        for a in (p.chosen, p.rejected):
            if (p.question, a) not in index:
                index[(p.question, a)] = len(prompts)
                prompts.append(fmt.prompt(p.question, tok))
                completions.append(fmt.completion(a))
    if not prompts:
        return PreferenceResult(float("nan"), None, float("nan"), None, 0, [], [])
    with edited(lm, edit, precision=precision):
        sums, counts = score_completions(lm.model, tok, prompts, completions, batch_size=batch_size,
                                         max_length=max_length,
                                         add_special_tokens=add_special_tokens_for(fmt, tok, prompts[0]))
    avg = (sums.double() / counts.clamp(min=1).double()).tolist()
    chosen = [avg[index[(p.question, p.chosen)]] for p in pairs]
    rejected = [avg[index[(p.question, p.rejected)]] for p in pairs]
    groups = [p.qid for p in pairs]
    acc, acc_se = clustered_mean_se([float(c > r) for c, r in zip(chosen, rejected)], groups)
    margin, margin_se = clustered_mean_se([c - r for c, r in zip(chosen, rejected)], groups)
    return PreferenceResult(acc, acc_se, margin, margin_se, len(pairs), chosen, rejected)
