"""Train locaudit's own truth / info judges on TruthfulQA's judge data, offline, with no leakage.

Every judge-data question that is an evaluation question (the held-out splits of the study's own
seeded question-level split, matched by normalised text; an unmatched question that resembles one is
dropped too) is kept out of training; held-out accuracy is measured on exactly those questions.
Features: frozen-LM states of "Q: q\\nA: a" (features.py) and reference-aware features (reffeatures.py).
Heads: L2 logistic regression and a small MLP; the L2 strength and the head type are chosen on a
seeded question-level validation split of the training questions, then refit on all of them.

Hardening (issue 11): hard negatives (hardneg.py: evasive non-answers, garbled, off-language and
repetitive text, the question copied) are generated from the judge data for every training question and
added to training; those of the held-out questions are scored apart (`held_out_hard`), so `held_out`
stays comparable with judges trained without them. The report adds expected calibration errors, a
reliability diagram (reliability.png) and the accuracy on the audit set of edited models' answers
(audit.py; audit.json beside the judge).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Annotated, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from locaudit.errors import ConfigError
from locaudit.evaluate.judges.base import References, normalise_question
from locaudit.evaluate.judges.calibration import expected_calibration_error, reliability_diagram
from locaudit.evaluate.judges.hardneg import hard_negatives
from locaudit.evaluate.judges.data import HoldOut, JudgeExample, load_holdout, load_judge_data
from locaudit.evaluate.judges.features import PairEncoder
from locaudit.models.precision import PrecisionName, as_precision, migrate_autocast_field
from locaudit.evaluate.judges.heads import Head, fit_logistic, fit_mlp
from locaudit.evaluate.judges.reffeatures import LEXICAL
from locaudit.evaluate.judges.trained import (JudgeFeatures, TrainedJudge, head_input, load_trained_judge,
                                              read_trained_judge, save_trained_judge)
from locaudit.io import atomic_dir, write_json_atomic

log = logging.getLogger(__name__)
LEX_EXACT = [LEXICAL.index("exact_correct"), LEXICAL.index("exact_incorrect")]


class JudgeTrainConfig(BaseModel):
    """What `locaudit judge train` does."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _old_autocast(cls, data):
        """The old `autocast` (bool) keeps loading, as `precision`."""
        return migrate_autocast_field(data, "JudgeTrainConfig")

    kinds: list[str] = Field(["truth", "info"], description="which judges to train: truth, info or both")
    model: str = Field("smollm2-135m-instruct", description="frozen backbone model whose states are the features")
    truth_data: Path | None = Field(None, description="finetune_truth.jsonl (TruthfulQA's truth-judge data)")
    info_data: Path | None = Field(None, description="finetune_info.jsonl (TruthfulQA's info-judge data)")
    holdout: str = Field(..., description="behaviour spec whose evaluation questions are held out, truthfulqa:PATH.csv")
    holdout_splits: list[str] = Field(["test"], description="splits of that spec held out of training")
    seed: int = Field(0, description="seed of the study's question-level split (must match the study)")
    fractions: tuple[float, float, float] = Field((0.6, 0.2, 0.2), description="train/val/test fractions of the study")
    max_questions: int | None = Field(None, ge=2, description="the study's max_questions (a subset changes the split)")
    layers: list[Annotated[int, Field(ge=0)]] = Field([3, 6, 9, 12], min_length=1, description="backbone layers whose states are features")
    max_length: int = Field(256, ge=8, description="max tokens of 'Q: ..\\nA: ..'")
    precision: PrecisionName = Field("auto", description="compute precision of the backbone's forward passes "
                                     "(auto: bf16 where the machine runs it faster, else fp32)")
    batch_size: int = Field(64, ge=1, description="backbone batch size")
    device: str = Field("auto", description="cpu, cuda or auto")
    trust_remote_code: bool = Field(False, description="run code shipped with the backbone's checkpoint (off unless "
                                    "you trust it)")
    val_fraction: float = Field(0.2, description="fraction of training questions used to choose the head")
    l2_grid: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field([1e-2, 3e-2, 0.1, 0.3], min_length=1, description="L2 strengths tried for logistic heads")
    mlp_weight_decay: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field([1e-2], min_length=1, description="AdamW weight decays tried for MLP heads")
    heads: list[str] = Field(["logistic", "mlp"], description="head types tried (logistic, mlp)")
    max_train_examples: int | None = Field(None, ge=1, description="cap on distinct training answers, one seeded subset "
                                           "shared by every kind (each answer's features are computed once)")
    max_heldout_examples: int | None = Field(None, ge=1, description="cap on distinct held-out answers evaluated (seeded)")
    cap_by: Literal["pair", "question"] = Field("pair", description="how the caps draw: pair = answers uniformly "
                                                "(touches nearly every question); question = whole questions until "
                                                "the cap (fewer questions' reference answers to encode)")
    hard_negatives: int = Field(2, ge=0, le=5, description="hard negatives per question (evasive, garbled, "
                                "off-language, repetitive, copied question; hardneg.py) added to training; 0 = none")
    audit: bool = Field(True, description="score the trained judge on the audit set of edited models' answers "
                        "(evaluate/judges/audit/audit.jsonl) and put the numbers in the report")

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, v: list[str]) -> list[str]:
        bad = [k for k in v if k not in ("truth", "info")]
        if bad or not v:
            raise ValueError(f"kinds {v!r}: each must be 'truth' or 'info'")
        return list(dict.fromkeys(v))

    @field_validator("heads")
    @classmethod
    def _heads(cls, v: list[str]) -> list[str]:
        bad = [h for h in v if h not in ("logistic", "mlp")]
        if bad or not v:
            raise ValueError(f"heads {v!r}: each must be 'logistic' or 'mlp'")
        return v

    @field_validator("val_fraction")
    @classmethod
    def _val(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError(f"val_fraction {v}: must be in (0, 1)")
        return v


def classifier_metrics(p: torch.Tensor, y: torch.Tensor) -> dict:
    pred = (p > 0.5).float()
    out = {"n": int(len(y)), "accuracy": float((pred == y).float().mean()) if len(y) else float("nan"),
           "positive_rate": float(y.mean()) if len(y) else float("nan"),
           "ece": expected_calibration_error(p.tolist(), y.tolist()) if len(y) else float("nan")}
    tpr = float(pred[y == 1].mean()) if (y == 1).any() else float("nan")
    tnr = float(1 - pred[y == 0].mean()) if (y == 0).any() else float("nan")
    out["balanced_accuracy"] = (tpr + tnr) / 2
    if (y == 1).any() and (y == 0).any():  # AUC by ranks
        ranks = torch.empty_like(p)
        ranks[p.argsort()] = torch.arange(1, len(p) + 1, dtype=p.dtype)
        n1, n0 = float((y == 1).sum()), float((y == 0).sum())
        out["auc"] = float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
    return out


def _fit(kind: str, x: torch.Tensor, y: torch.Tensor, l2: float, seed: int) -> Head:
    return fit_logistic(x, y, l2) if kind == "logistic" else fit_mlp(x, y, weight_decay=l2, seed=seed)


def _choose_and_fit(x: torch.Tensor, y: torch.Tensor, groups: Sequence[str], cfg: JudgeTrainConfig,
                    label: str) -> tuple[Head, dict]:
    """Pick the head on a question-level validation split of the training questions: each head type with
    its best L2 strength, and the average of the best of each type (ensemble); then refit on everything."""
    qs = sorted(set(groups))
    random.Random(f"locaudit-judge-val-{cfg.seed}").shuffle(qs)
    val_q = set(qs[: max(1, round(cfg.val_fraction * len(qs)))])
    is_val = torch.tensor([g in val_q for g in groups])
    results, best_of = [], {}
    for head in cfg.heads:
        grid = cfg.l2_grid if head == "logistic" else cfg.mlp_weight_decay
        for l2 in grid:
            h = _fit(head, x[~is_val], y[~is_val], l2, cfg.seed)
            p = h.prob(x[is_val])
            acc = classifier_metrics(p, y[is_val])["accuracy"]
            results.append({"head": head, "l2": l2, "val_accuracy": acc})
            log.info("%s: %s l2=%g val acc %.4f", label, head, l2, acc)
            if head not in best_of or acc > best_of[head][0]:
                best_of[head] = (acc, l2, p)
    if len(best_of) > 1:
        p = torch.stack([b[2] for b in best_of.values()]).mean(0)
        acc = classifier_metrics(p, y[is_val])["accuracy"]
        results.append({"head": "ensemble", "l2": {h: b[1] for h, b in best_of.items()}, "val_accuracy": acc})
        log.info("%s: ensemble of the best %s val acc %.4f", label, list(best_of), acc)
    best = max(results, key=lambda r: r["val_accuracy"])
    if best["head"] == "ensemble":
        final = Head.ensemble([_fit(h, x, y, l2, cfg.seed) for h, l2 in best["l2"].items()])
    else:
        final = _fit(best["head"], x, y, best["l2"], cfg.seed)
    return final, {"chosen": best, "search": results, "n_val_questions": len(val_q), "n_train_examples": int(len(y))}


def _capped_pairs(examples: Sequence[JudgeExample], cap: int | None, seed: str, by: str = "pair") -> set | None:
    """A seeded subset of at most `cap` distinct (question, answer) pairs of `examples` (None: no cap).
    by="question": whole questions in a seeded order while they fit (at least one question)."""
    pairs = sorted({(e.question, e.answer) for e in examples})
    if cap is None or len(pairs) <= cap:
        return None
    if by == "pair":
        return set(random.Random(seed).sample(pairs, cap))
    per_q: dict[str, list] = {}
    for p in pairs:
        per_q.setdefault(p[0], []).append(p)
    questions = sorted(per_q)
    random.Random(seed).shuffle(questions)
    keep: set = set()
    for q in questions:
        if keep and len(keep) + len(per_q[q]) > cap:
            continue
        keep.update(per_q[q])
    return keep


def _judge_prob(heads: dict, kind: str, hidden: torch.Tensor, ref: torch.Tensor, has: torch.Tensor,
                rows: torch.Tensor) -> torch.Tensor:
    """The judge's probability for `rows` as it scores: the reference head where references exist (`has`), the
    no-reference head elsewhere."""
    p = heads[(kind, "noref")].prob(hidden[rows])
    h = has[rows]
    if h.any():
        p[h] = heads[(kind, "ref")].prob(head_input("ref", hidden[rows][h], ref[rows][h]))
    return p


def _judge_splits(cfg: JudgeTrainConfig, holdout: HoldOut) -> tuple[dict, dict, dict, dict]:
    """The judge data of each kind split by question (train/unmatched vs held out, capped as `cfg` asks), with
    the hard negatives added: (each question's role, {kind: {part: examples}}, the hard negatives by part,
    each hard negative's category)."""
    data: dict[str, list[JudgeExample]] = {}
    for kind in cfg.kinds:
        path = cfg.truth_data if kind == "truth" else cfg.info_data
        if path is None:
            raise ConfigError(f"--{kind}-data: no {kind} judge data file given (finetune_{kind}.jsonl)")
        data[kind] = load_judge_data(path, kind)
    role = holdout.assign([e.question for ex in data.values() for e in ex])
    split: dict[str, dict[str, list[JudgeExample]]] = {}
    # caps draw one seeded subset of distinct (question, answer) pairs shared by every kind: the truth and
    # info files label the same answers (in another order), so each answer's features are computed once
    keep_tr = _capped_pairs([e for ex in data.values() for e in ex if role[e.question] in ("train", "unmatched")],
                            cfg.max_train_examples, f"locaudit-judge-cap-{cfg.seed}", cfg.cap_by)
    keep_te = _capped_pairs([e for ex in data.values() for e in ex if role[e.question] == "held_out"],
                            cfg.max_heldout_examples, f"locaudit-judge-heldout-cap-{cfg.seed}", cfg.cap_by)
    for kind, ex in data.items():
        tr = [e for e in ex if role[e.question] in ("train", "unmatched") and (keep_tr is None or (e.question, e.answer) in keep_tr)]
        te = [e for e in ex if role[e.question] == "held_out" and (keep_te is None or (e.question, e.answer) in keep_te)]
        held_q = {normalise_question(e.question) for e in te}
        assert not held_q & {normalise_question(e.question) for e in tr}, "leak: a held-out question is in training"
        assert held_q <= holdout.held_out
        split[kind] = {"train": tr, "held_out": te}
    kept = {e.question for parts in split.values() for part in parts.values() for e in part}  # caps bound them too
    hard = _hard_negatives(data, role, cfg.hard_negatives, kept)
    for kind in split:
        for part, examples in hard.items():
            extra = [JudgeExample(h.question, h.answer, lab, -1) for h in examples
                     if (lab := h.label(kind)) is not None]
            if part == "train":
                split[kind]["train"] = split[kind]["train"] + extra
            else:
                split[kind]["held_out_hard"] = extra
    category = {(h.question, h.answer): h.category for ex in hard.values() for h in ex}
    return role, split, hard, category


def train_judge(cfg: JudgeTrainConfig, out_dir: str | Path, lm=None) -> dict:
    """Train, evaluate on the held-out questions, save to `out_dir`; returns the report (also in judge.json)."""
    from locaudit.models.loading import load_model

    t0 = time.time()
    final = Path(out_dir)
    check_judge_target(final)  # before any work
    holdout = load_holdout(cfg.holdout, cfg.holdout_splits, cfg.seed, cfg.fractions, cfg.max_questions)
    references = References.from_spec(cfg.holdout)
    role, split, hard, category = _judge_splits(cfg, holdout)
    if lm is None:
        lm = load_model(cfg.model, dtype="fp32", device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    encoder = PairEncoder(lm, cfg.layers, batch_size=cfg.batch_size, max_length=cfg.max_length,
                           precision=as_precision(cfg.precision, lm.device))
    pairs = list(dict.fromkeys((e.question, e.answer) for s in split.values() for part in s.values() for e in part))
    log.info("judge features: %d distinct (question, answer) pairs, layers %s of %s", len(pairs), encoder.layers, cfg.model)
    t_feat = time.time()
    feats = JudgeFeatures(encoder, references)
    hidden4 = feats.hidden([p[0] for p in pairs], [p[1] for p in pairs])
    train_pairs = {(e.question, e.answer) for s in split.values() for e in s["train"]}
    index = {p: i for i, p in enumerate(pairs)}
    train_rows = torch.tensor([index[p] for p in pairs if p in train_pairs])
    feats.center = hidden4[train_rows][:, :, 0].float().mean(0)
    ref, has = feats.ref([p[0] for p in pairs], [p[1] for p in pairs], hidden4)
    hidden = hidden4.reshape(len(pairs), -1)
    feat_s = time.time() - t_feat

    heads: dict[tuple[str, str], Head] = {}
    curves: dict[str, tuple[list, list]] = {}
    report: dict = {"hard_negatives": {part: len(ex) for part, ex in hard.items()},
                    "kinds": {}, "holdout": holdout.describe(),
                    "questions": {r: sum(1 for v in role.values() if v == r) for r in set(role.values())}}
    for kind, s in split.items():
        rows_tr = torch.tensor([index[(e.question, e.answer)] for e in s["train"]])
        rows_te = torch.tensor([index[(e.question, e.answer)] for e in s["held_out"]], dtype=torch.long)
        y_tr = torch.tensor([float(e.label) for e in s["train"]])
        y_te = torch.tensor([float(e.label) for e in s["held_out"]])
        groups = [normalise_question(e.question) for e in s["train"]]
        kind_report: dict = {"n_train_questions": len(set(groups)),
                             "n_heldout_questions": len({normalise_question(e.question) for e in s["held_out"]})}
        for variant in ("ref", "noref"):
            keep = has[rows_tr] if variant == "ref" else torch.ones(len(rows_tr), dtype=torch.bool)
            x = head_input(variant, hidden[rows_tr[keep]], ref[rows_tr[keep]])
            head, search = _choose_and_fit(x, y_tr[keep], [g for g, k in zip(groups, keep.tolist()) if k], cfg,
                                           f"{kind}.{variant}")
            heads[(kind, variant)] = head
            kind_report[variant] = {"selection": search}
        # held-out: the judge as it scores (ref head where references exist), and the no-reference head alone
        p_ref = _judge_prob(heads, kind, hidden, ref, has, rows_te)
        kind_report["held_out"] = classifier_metrics(p_ref, y_te)
        kind_report["held_out_noref"] = classifier_metrics(heads[(kind, "noref")].prob(hidden[rows_te]), y_te)
        exact = ref[rows_te][:, LEX_EXACT].sum(1) > 0
        kind_report["held_out_not_a_reference"] = classifier_metrics(p_ref[~exact], y_te[~exact])
        curves[f"{kind} held-out"] = (p_ref.tolist(), y_te.tolist())
        hard_te = s.get("held_out_hard", [])
        if hard_te:
            rows_h = torch.tensor([index[(e.question, e.answer)] for e in hard_te], dtype=torch.long)
            p_h = _judge_prob(heads, kind, hidden, ref, has, rows_h)
            y_h = torch.tensor([float(e.label) for e in hard_te])
            cats = [category[(e.question, e.answer)] for e in hard_te]
            kind_report["held_out_hard"] = classifier_metrics(p_h, y_h)
            kind_report["held_out_hard_by_category"] = {
                c: classifier_metrics(p_h[torch.tensor([x == c for x in cats])],
                                      y_h[torch.tensor([x == c for x in cats])])
                for c in sorted(set(cats))}
        report["kinds"][kind] = kind_report
        log.info("%s judge: held-out accuracy %.4f on %d answers to %d held-out questions", kind,
                 kind_report["held_out"]["accuracy"], len(y_te), kind_report["n_heldout_questions"])
    report["feature_seconds"] = round(feat_s, 1)
    report["total_seconds"] = round(time.time() - t0, 1)
    meta = {"model": cfg.model, "model_fingerprint": lm.fingerprint,
            "encoder": {"layers": list(encoder.layers), "max_length": cfg.max_length,
                        "precision": encoder.precision.name},
            "ref_features": feats.ref_names,
            "references": {"source": references.source, "fingerprint": references.fingerprint},
            "config": cfg.model_dump(mode="json"), "report": report}
    # the whole folder is written beside `out_dir` and swapped in once complete and readable: a killed or
    # failed training leaves the previous judge whole (never new weights beside an old judge.json)
    with atomic_dir(final, verify=read_trained_judge) as out_dir:
        _write_judge_folder(out_dir, cfg, meta, heads, feats, references, lm, report, curves)
    return report


JUDGE_FILES = ("judge.json", "judge.safetensors", "report.json", "audit.json", "reliability.png", "checksums.json")


def check_judge_target(out_dir: Path) -> None:
    """Refuse to replace a folder that holds anything but a judge's own files (it is replaced as a whole)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"judge output {out_dir} is a file; give a folder")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in JUDGE_FILES and not p.name.startswith("."))
        if foreign:
            raise ConfigError(f"judge output folder {out_dir} holds files that are not a judge's ({', '.join(foreign[:5])}); "
                              "the folder is replaced as a whole when training ends: give an empty or judge folder")


def _write_judge_folder(out_dir: Path, cfg: JudgeTrainConfig, meta: dict, heads, feats, references, lm, report: dict,
                        curves: dict) -> None:
    save_trained_judge(out_dir, meta, heads, feats.center)
    if cfg.audit:
        from locaudit.evaluate.judges.audit import audit_judge, load_audit

        items = load_audit()
        judge = load_trained_judge(out_dir, references=references, lm=lm)
        audit = audit_judge(judge, items, references=references)
        write_json_atomic(Path(out_dir) / "audit.json", audit)
        report["audit"] = {k: {m: v for m, v in kr.items() if m != "reliability"} for k, kr in audit["kinds"].items()}
        report["audit"]["reference"] = {m: ({k: v for k, v in r.items() if k != "reliability"}
                                            if isinstance(r, dict) else r) for m, r in audit.get("reference", {}).items()}
        for kind in audit["kinds"]:
            p = [r[f"p_{kind}"] for r in audit["answers"]]
            curves[f"{kind} audit (edited models)"] = (p, [getattr(it, kind) for it in items])
    if curves:
        reliability_diagram(curves, Path(out_dir) / "reliability.png", title="Judge reliability")
        report["reliability_diagram"] = "reliability.png"
    write_json_atomic(Path(out_dir) / "report.json", report)


def _hard_negatives(data: dict[str, list[JudgeExample]], role: dict[str, str], per_question: int,
                    kept: set[str] | None = None) -> dict:
    """Hard negatives of the training questions ('train') and of the held-out ones ('held_out'); only of the
    questions in `kept` (those the example caps kept), so the caps bound the cost."""
    if per_question <= 0:
        return {}
    answers_of: dict[str, list[str]] = {}
    for ex in data.values():
        for e in ex:
            answers_of.setdefault(e.question, []).append(e.answer)
    qs = sorted(q for q in answers_of if kept is None or q in kept)
    return {"train": hard_negatives([q for q in qs if role[q] in ("train", "unmatched")], answers_of, per_question),
            "held_out": hard_negatives([q for q in qs if role[q] == "held_out"], answers_of, per_question)}


__all__ = ["JudgeTrainConfig", "TrainedJudge", "load_trained_judge", "train_judge"]
