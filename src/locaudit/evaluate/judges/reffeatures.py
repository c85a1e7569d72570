"""Reference-aware features for the trained truth judge: how close an answer is to the question's
correct vs incorrect TruthfulQA reference answers (the signal TruthfulQA's BLEU/ROUGE/BLEURT metrics
use), lexically and in the frozen LM's representation space."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from locaudit.evaluate.judges.base import References
from locaudit.evaluate.judges.reference import METRICS, reference_scores

LEXICAL = [f"{m}_{side}" for m in METRICS for side in ("max_correct", "max_incorrect", "diff")] + [
    "exact_correct", "exact_incorrect"]


def _norm_answer(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def lexical_features(questions: Sequence[str], answers: Sequence[str], references: References,
                     progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(Float[N, len(LEXICAL)] in [-1, 1], Bool[N] whether the question has references).
    Rows of questions without references are zero."""
    out = np.zeros((len(answers), len(LEXICAL)), dtype=np.float32)
    has = np.zeros(len(answers), dtype=bool)
    memo: dict[tuple[str, str], np.ndarray] = {}
    for i, (q, a) in enumerate(tqdm(list(zip(questions, answers)), desc="lexical features",
                                    disable=not progress or len(answers) < 500)):
        refs = references.lookup(q, with_no_comment=True)
        if refs is None:
            continue
        has[i] = True
        key = (q, a)
        if key not in memo:
            correct, incorrect = refs
            row = []
            if a.strip():
                rs = reference_scores(a, correct, incorrect)
                for m in METRICS:
                    row += [rs.max_correct[m] / 100, rs.max_incorrect[m] / 100, rs.diff(m) / 100]
            else:
                row += [0.0] * (3 * len(METRICS))
            na = _norm_answer(a)
            row += [float(any(na == _norm_answer(r) for r in correct)), float(any(na == _norm_answer(r) for r in incorrect))]
            memo[key] = np.asarray(row, dtype=np.float32)
        out[i] = memo[key]
    return out, has


def embedding_names(layers: Sequence[int]) -> list[str]:
    return [f"cos_L{l}_{side}" for l in layers for side in ("max_correct", "max_incorrect", "diff")]


def embedding_features(answer_vecs: torch.Tensor, ref_vecs: list[tuple[torch.Tensor, torch.Tensor] | None],
                       center: torch.Tensor) -> torch.Tensor:
    """Max centred cosine similarity of each answer to its correct / incorrect references, per layer.

    answer_vecs: Float[Tensor, "N layer d"] (mean-pooled answer states); ref_vecs[i]: (correct
    Float[Tensor, "Nc layer d"], incorrect Float[Tensor, "Ni layer d"]) or None; center: Float[Tensor,
    "layer d"] (the mean answer state, removed so that cosines are not all near 1).
    Returns Float[Tensor, "N layer*3"] (zeros where ref_vecs[i] is None).
    """
    N, L, _ = answer_vecs.shape
    out = torch.zeros(N, L, 3)

    def unit(x: torch.Tensor) -> torch.Tensor:
        x = x - center
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    a = unit(answer_vecs.float())
    for i, rv in enumerate(ref_vecs):
        if rv is None:
            continue
        c = (unit(rv[0].float()) * a[i]).sum(-1).amax(0)  # [L]
        w = (unit(rv[1].float()) * a[i]).sum(-1).amax(0)
        out[i] = torch.stack([c, w, c - w], -1)
    return out.reshape(N, L * 3)
