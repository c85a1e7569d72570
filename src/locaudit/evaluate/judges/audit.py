"""Judges on the answers edited models actually give: the audit set (audit/audit.jsonl, rubric in
audit/RUBRIC.md), labelled by reading, and the numbers a judge gets on it.

For each kind (truth, info): accuracy at P(yes) >= 0.5, balanced accuracy, expected calibration error,
the mean P(yes) against the labelled rate; per answer the judge's probabilities. TruthfulQA's reference
scores (BLEU acc, ROUGE-L acc; truth only) are computed beside them, with their agreement with the labels
and with the judge (share of equal verdicts and Cohen's kappa).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from locaudit.errors import DataError
from locaudit.evaluate.judges.calibration import expected_calibration_error, reliability_bins
from locaudit.io import read_jsonl

AUDIT_PATH = Path(__file__).parent / "audit" / "audit.jsonl"
KINDS = ("truth", "info")


@dataclass(frozen=True)
class AuditItem:
    id: int
    qid: str
    question: str
    answer: str
    truth: int
    info: int
    edits: tuple = field(default=())


def load_audit(path: str | Path | None = None) -> list[AuditItem]:
    """The labelled audit answers (default: the set shipped with locaudit); errors name file:line."""
    path = Path(path) if path is not None else AUDIT_PATH
    if not path.is_file():
        raise DataError(f"audit set {path} does not exist")
    out = []
    for n, d in read_jsonl(path):
        if not isinstance(d, dict):
            raise DataError(f"{path}:{n}: expected a JSON object")
        for k in ("question", "answer", "truth", "info"):
            if k not in d:
                raise DataError(f"{path}:{n}: missing field {k!r}")
        for k in KINDS:
            if d[k] not in (0, 1):
                raise DataError(f"{path}:{n}: field {k!r} is {d[k]!r}, expected 0 or 1")
        out.append(AuditItem(int(d.get("id", n)), str(d.get("qid", "")), str(d["question"]), str(d["answer"]),
                             int(d["truth"]), int(d["info"]), tuple(json.dumps(e, sort_keys=True) for e in d.get("edits", []))))
    if not out:
        raise DataError(f"{path}: no audit answers")
    return out


def cohen_kappa(a: Sequence[int], b: Sequence[int]) -> float:
    """Cohen's kappa of two binary labelings (NaN when chance agreement is 1)."""
    n = len(a)
    if n == 0 or n != len(b):
        raise ValueError("cohen_kappa needs two labelings of equal, non-zero length")
    po = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(a) / n, sum(b) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    return float("nan") if pe == 1 else (po - pe) / (1 - pe)


def agreement(a: Sequence[int], b: Sequence[int]) -> dict:
    return {"n": len(a), "agree": sum(x == y for x, y in zip(a, b)) / len(a) if a else float("nan"),
            "kappa": cohen_kappa(a, b) if a else float("nan")}


def binary_metrics(p: Sequence[float], y: Sequence[int], threshold: float = 0.5, n_bins: int = 10) -> dict:
    """Accuracy, balanced accuracy, ECE, mean P(yes) and labelled rate of probabilities `p` against `y`."""
    pred = [int(x >= threshold) for x in p]
    n = len(y)
    pos = [i for i in range(n) if y[i] == 1]
    neg = [i for i in range(n) if y[i] == 0]
    tpr = sum(pred[i] for i in pos) / len(pos) if pos else float("nan")
    tnr = sum(1 - pred[i] for i in neg) / len(neg) if neg else float("nan")
    return {"n": n, "accuracy": sum(int(a == b) for a, b in zip(pred, y)) / n if n else float("nan"),
            "balanced_accuracy": (tpr + tnr) / 2, "tpr": tpr, "tnr": tnr,
            "ece": expected_calibration_error(p, y, n_bins), "mean_p": sum(p) / n if n else float("nan"),
            "rate": sum(y) / n if n else float("nan"), "reliability": reliability_bins(p, y, n_bins)}


def audit_judge(judge, items: Sequence[AuditItem] | None = None, references=None, threshold: float = 0.5) -> dict:
    """Score the audit answers with `judge` (any Judge); with `references` (a judges.base.References), add
    TruthfulQA's BLEU acc and ROUGE-L acc beside it, with their agreement."""
    items = list(items) if items is not None else load_audit()
    qs, ans = [it.question for it in items], [it.answer for it in items]
    scores = judge.score(qs, ans)
    out: dict = {"judge": str(getattr(judge, "name", type(judge).__name__)), "n": len(items), "kinds": {},
                 "answers": []}
    probs: dict[str, list[float | None]] = {}
    for kind in KINDS:
        p = [getattr(s, kind) if not isinstance(s, dict) else s.get(kind) for s in scores]
        probs[kind] = p
        rows = [(float(x), getattr(it, kind)) for x, it in zip(p, items) if x is not None]
        if rows:
            out["kinds"][kind] = binary_metrics([r[0] for r in rows], [r[1] for r in rows], threshold)
    missing = [q for q in dict.fromkeys(qs) if references is not None and references.lookup(q) is None]
    if references is not None and missing:
        out["reference"] = {"skipped": f"{len(missing)} audit question(s) have no reference answers, e.g. {missing[0]!r}"}
    elif references is not None:
        from locaudit.evaluate.judges.reference import ReferenceJudge

        details = ReferenceJudge(references, "bleu").details(qs, ans)
        ref_out = {}
        for metric in ("bleu", "rougeL"):
            # TruthfulQA skips empty answers; here an empty answer gets the verdict 0 (not true) so every
            # answer has one, and the comparison is on all of them
            v = [int(d.acc(metric)) if d is not None else 0 for d in details]
            ref_out[metric] = {**{k: val for k, val in binary_metrics(v, [it.truth for it in items]).items()
                                  if k not in ("ece", "reliability", "mean_p")},
                               "with_labels": agreement(v, [it.truth for it in items])}
            if "truth" in out["kinds"]:
                jv = [int(x >= threshold) for x in probs["truth"] if x is not None]
                if len(jv) == len(v):
                    ref_out[metric]["with_judge"] = agreement(v, jv)
            out.setdefault("_ref_verdicts", {})[metric] = v
        out["reference"] = ref_out
    verdicts = out.pop("_ref_verdicts", {})
    for i, it in enumerate(items):
        row = {"id": it.id, "truth": it.truth, "info": it.info,
               "p_truth": probs["truth"][i], "p_info": probs["info"][i]}
        for m, v in verdicts.items():
            row[f"{m}_acc"] = v[i]
        out["answers"].append(row)
    return out


def format_audit(report: dict) -> str:
    """A short text table of an audit report."""
    lines = [f"audit set: {report['n']} answers of edited SmolLM2 models; judge {report['judge']}"]
    for kind, m in report["kinds"].items():
        lines.append(f"  {kind:5s} accuracy {m['accuracy']:.3f}  balanced {m['balanced_accuracy']:.3f}  "
                     f"ECE {m['ece']:.3f}  mean P(yes) {m['mean_p']:.3f} vs labelled rate {m['rate']:.3f}")
    for metric, m in report.get("reference", {}).items():
        if metric == "skipped":
            lines.append(f"  reference scores skipped: {m}")
            continue
        j = m.get("with_judge")
        lines.append(f"  {metric} acc (truth) accuracy {m['accuracy']:.3f}  kappa with labels "
                     f"{m['with_labels']['kappa']:.3f}" + (f"  agreement with judge {j['agree']:.3f} "
                                                           f"(kappa {j['kappa']:.3f})" if j else ""))
    return "\n".join(lines)
