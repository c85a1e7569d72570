"""One result record per evaluated edit: JSON file plus one row appended to a CSV.

True and Info, as ITI and the paper report them: the share of answers the judge calls true (P(yes) >= the
threshold, 0.5), the share it calls informative, and True*Info = the product of those two shares. The mean
probabilities (`true_prob`, `info_prob`, `true_info_prob`) are kept beside them: they depend on the judge's
calibration, which `locaudit judge` measures (expected calibration error).

Standard errors: for a mean over questions, sample std / sqrt(n). For True*Info (the product of the
means, as ITI reports it) the delta method with the per-question pairs (t_i, i_i):
  Var(T I) ~ I^2 Var(T) + T^2 Var(I) + 2 T I Cov(T, I),  Var/Cov of the means = sample (co)variance / n.
The mean of per-question products t_i * i_i gets an ordinary SE. MC: SE over questions. KL/CE:
cluster-robust over texts (klce.py). Preferences: cluster-robust over questions (preferences.py).
"""

from __future__ import annotations

import csv
import io
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, Field

from locaudit.errors import DataError
from locaudit.io import write_json_atomic, write_text_atomic


def mean_se(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and its standard error (sample std / sqrt n); None where undefined."""
    n = len(values)
    if n == 0:
        return None, None
    m = sum(values) / n
    if n < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def product_of_means_se(a: Sequence[float], b: Sequence[float]) -> tuple[float | None, float | None]:
    """mean(a) * mean(b) and its delta-method SE from paired samples."""
    n = len(a)
    if n == 0 or n != len(b):
        return None, None
    ma, mb = sum(a) / n, sum(b) / n
    if n < 2:
        return ma * mb, None
    va = sum((x - ma) ** 2 for x in a) / (n - 1)
    vb = sum((y - mb) ** 2 for y in b) / (n - 1)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b)) / (n - 1)
    var = (mb * mb * va + ma * ma * vb + 2 * ma * mb * cov) / n
    return ma * mb, math.sqrt(max(var, 0.0))


class EvalResult(BaseModel):
    """Every metric of one edit on one split; None where a metric was not asked for."""

    edit: dict = Field(default_factory=dict, description="The edit's describe(): kind, head set, alpha, ...")
    model: str = Field("", description="Model name as loaded.")
    model_fingerprint: str = Field("", description="Content fingerprint of the model's weights and config.")
    data: str = Field("", description="Behaviour dataset name.")
    data_fingerprint: str = Field("", description="Content fingerprint of the dataset and its split.")
    split: str = Field("test", description="Evaluation split.")
    format: str = Field("plain", description="Prompt format (plain or chat).")
    protocol: str = Field("bare", description="Evaluation protocol: iti (ITI's instruction + TruthfulQA's QA "
                          "primer before every generation and MC prompt) or bare (no preamble).")
    mc_prefix: str | None = Field(None, description="What preceded each MC prompt: protocol, primer or none.")
    precision: str = Field("fp32", description="Resolved compute precision (fp32, bf16 or fp16).")
    cpu_capability: str = Field("", description="What the CPU offers for matmuls (AVX2, AVX512, AMX, ...).")
    metrics: list[str] = Field(default_factory=list, description="Metrics computed.")
    n_questions: int = Field(0, description="Questions in the split.")
    n_mc: int | None = Field(None, description="MC items scored.")
    n_pairs: int | None = Field(None, description="Preference pairs scored.")
    n_kl_tokens: int | None = Field(None, description="Next-token positions in the KL/CE text.")
    n_kl_texts: int | None = Field(None, description="Texts (windows) in the KL/CE text.")
    kl_text: str | None = Field(None, description="What KL/CE were measured on: a generic corpus name, a file, "
                                "or 'answers' (the split's questions with their best answers).")
    kl_text_fingerprint: str | None = Field(None, description="Content fingerprint of the KL/CE text.")
    n_generated: int | None = Field(None, description="Answers generated.")
    true: float | None = Field(None, description="Share of answers judged true (P(true) >= judge_threshold), as ITI.")
    true_se: float | None = None
    info: float | None = Field(None, description="Share of answers judged informative (P(info) >= judge_threshold).")
    info_se: float | None = None
    true_info: float | None = Field(None, description="True * Info of the thresholded shares, as ITI and the paper.")
    true_info_se: float | None = Field(None, description="Delta-method SE of the product of shares.")
    true_info_per_q: float | None = Field(None, description="Share of answers judged both true and informative.")
    true_info_per_q_se: float | None = None
    true_prob: float | None = Field(None, description="Mean judged probability of truth (calibration-dependent).")
    true_prob_se: float | None = None
    info_prob: float | None = Field(None, description="Mean judged probability of informativeness.")
    info_prob_se: float | None = None
    true_info_prob: float | None = Field(None, description="mean P(true) * mean P(info) (locaudit's old True*Info).")
    true_info_prob_se: float | None = None
    judge_threshold: float | None = Field(None, description="P(yes) at or above which an answer counts as judged yes.")
    mc1: float | None = Field(None, description="TruthfulQA MC1 accuracy.")
    mc1_se: float | None = None
    mc2: float | None = Field(None, description="TruthfulQA MC2 (normalised correct mass).")
    mc2_se: float | None = None
    mc0: float | None = Field(None, description="Binary-choice MC of the Jan-2025 file (best vs best incorrect).")
    mc0_se: float | None = None
    kl: float | None = Field(None, description="Mean KL(p_orig || p_edit) per next-token position.")
    kl_se: float | None = None
    ce: float | None = Field(None, description="Edited model's mean cross-entropy per token (nats).")
    ce_se: float | None = None
    kl_answers: float | None = Field(None, description="KL on the split's questions + best answers (bare format): "
                                     "the text IPO up-weights, not collateral damage; a second, labelled metric.")
    kl_answers_se: float | None = None
    ce_answers: float | None = Field(None, description="CE on the split's questions + best answers (bare format).")
    ce_answers_se: float | None = None
    n_kl_answers_tokens: int | None = Field(None, description="Next-token positions in the answer text.")
    pref_acc: float | None = Field(None, description="Held-out pairs with avg logp(chosen) > avg logp(rejected).")
    pref_acc_se: float | None = None
    pref_margin: float | None = Field(None, description="Mean avg-logp(chosen) - avg-logp(rejected).")
    pref_margin_se: float | None = None
    judge: str | None = Field(None, description="Judge identity used for True/Info.")
    seconds: dict[str, float] = Field(default_factory=dict, description="Wall time per metric.")
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def set_judged(self, truth: Sequence[float | None], info: Sequence[float | None], judge_name: str,
                   threshold: float = 0.5) -> None:
        """Fill True, Info, True*Info (thresholded at `threshold`, as ITI; and as mean probabilities) and
        their SEs from per-question judge probabilities.

        A judge may score only one kind (None entries); products need both kinds for every question.
        """
        t = [x for x in truth if x is not None]
        i = [x for x in info if x is not None]
        tb = [float(x >= threshold) for x in t]
        ib = [float(x >= threshold) for x in i]
        self.true, self.true_se = mean_se(tb)
        self.info, self.info_se = mean_se(ib)
        self.true_prob, self.true_prob_se = mean_se(t)
        self.info_prob, self.info_prob_se = mean_se(i)
        both = len(t) == len(truth) and len(i) == len(info)
        if both:
            self.true_info, self.true_info_se = product_of_means_se(tb, ib)
            self.true_info_per_q, self.true_info_per_q_se = mean_se([a * b for a, b in zip(tb, ib)])
            self.true_info_prob, self.true_info_prob_se = product_of_means_se(t, i)
        self.judge = judge_name
        self.judge_threshold = threshold

    def row(self) -> dict[str, Any]:
        """A flat CSV row: the edit's description fields become edit_<key>."""
        d = self.model_dump()
        edit = d.pop("edit")
        d["metrics"] = ",".join(d["metrics"])
        d["seconds"] = json.dumps(d["seconds"], sort_keys=True)
        return {**{f"edit_{k}": (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in edit.items()}, **d}

    def save_json(self, path: str | Path) -> Path:
        write_json_atomic(path, self.model_dump())
        return Path(path)

    @classmethod
    def load_json(cls, path: str | Path) -> "EvalResult":
        path = Path(path)
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not an EvalResult JSON ({e})") from e

    def append_csv(self, path: str | Path) -> Path:
        """Append this result as a row (columns widened to the union if needed); the file is rewritten
        atomically, so a crash never leaves half a row."""
        path = Path(path)
        rows: list[dict[str, Any]] = []
        columns: list[str] = []
        if path.exists():
            reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))
            columns = list(reader.fieldnames or [])
            rows = list(reader)
        new = self.row()
        columns += [c for c in new if c not in columns]
        rows.append(new)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
        w.writeheader()
        for r in rows:
            # strict like the JSON: a non-finite number is an empty field, never a bare NaN or inf
            w.writerow({k: ("" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v)
                        for k, v in r.items()})
        write_text_atomic(path, buf.getvalue())
        return path
