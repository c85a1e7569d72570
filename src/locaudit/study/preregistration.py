"""A verdict fixed before the results: what decides it, recorded at run start, and what a report changed.

`locaudit run` records, once, in the ledger's meta (key "preregistered") before any trial runs: the
verdict section (alpha, margin, multiplicity, level, primary metric: docs/verdict.md) and the judge as it
resolves on that machine (`${LOCAUDIT_JUDGE:-default:small}` expanded; for a judge trained by locaudit
`trained:DIR`, its folder and a hash of its files). A report compares its own settings with that record:
every difference is named in the headline ("Re-analysed: judge X instead of the pre-registered Y") and
`verdict.json` carries both records. Later runs of the same folder never overwrite the first record.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from locaudit.study.spec import VerdictSpec

KEY = "preregistered"
FIELDS = ("alpha", "margin", "multiplicity", "level", "primary_metric")


def _folder_hash(path: Path, max_bytes: int = 1 << 20) -> str | None:
    """sha256 over the folder's files (name, size, and content of files up to max_bytes)."""
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.relative_to(path)}\0{size}\0".encode())
        if size <= max_bytes:
            h.update(f.read_bytes())
    return h.hexdigest()


def judge_record(spec: Any) -> dict:
    """The study's judge: as written, as resolved (environment templates expanded, a relative trained:DIR
    made absolute) and, for a trained judge, its folder and content hash. `spec`: a StudySpec or its JSON."""
    from locaudit.study.spec import StudySpec, expand_env

    raw = spec.get("evaluation", {}).get("judge") if isinstance(spec, dict) else spec.evaluation.judge
    out: dict[str, Any] = {"written": raw, "resolved": None}
    if not raw:
        return out
    try:
        s = spec if not isinstance(spec, dict) else StudySpec.model_validate(spec)
        out["resolved"] = s.resolved_judge()
    except Exception:  # an old spec or an unset variable: expand what can be expanded
        try:
            out["resolved"] = expand_env(raw, "evaluation.judge")
        except Exception as e:
            out["resolved"] = None
            out["error"] = str(e)[:300]
    kind, _, rest = str(out["resolved"] or "").partition(":")
    if kind == "trained" and rest:
        out["folder"] = str(Path(rest).expanduser().resolve())
        out["hash"] = _folder_hash(Path(out["folder"]))
    elif kind == "default":
        try:
            out["folder"] = str(_default_judge_dir(s, rest))
            out["hash"] = _folder_hash(Path(out["folder"]))  # None until it is trained (on first use)
        except Exception as e:  # a spec the default judge cannot serve: the run says so when it builds it
            out["folder_error"] = str(e)[:300]
    return out


def _default_judge_dir(spec: Any, size: str) -> Path:
    """The cache folder of the study's default judge (its hold-out: trials.judge_holdout, as the run sets it up)."""
    from locaudit.evaluate.judges.registry import default_judge_dir
    from locaudit.study.trials import judge_holdout

    d = spec.data
    return default_judge_dir(spec.resolved_data_spec(), judge_holdout(spec), d.seed, tuple(d.fractions),
                             d.max_questions, size=size)


def record(spec: Any) -> dict:
    """What decides the verdict, as configured at run start."""
    v = spec.verdict if not isinstance(spec, dict) else VerdictSpec.model_validate(spec.get("verdict") or {})
    return {"verdict": v.model_dump(), **{k: getattr(v, k) for k in FIELDS}, "judge": judge_record(spec),
            "recorded": time.strftime("%Y-%m-%d %H:%M:%S")}


def preregister(ledger, spec: Any) -> dict:
    """Record the verdict configuration once (the first run start); later calls keep the first record."""
    old = ledger.get_meta(KEY)
    if old is None:
        old = record(spec)
        ledger.set_meta(KEY, old)
    return old


def deviations(pre: dict | None, cfg: VerdictSpec, judge: str | None, rejudged: bool = False) -> list[str]:
    """How the analysis differs from the pre-registered record, in words (empty: as registered)."""
    if not pre:
        return []
    out = []
    pj = (pre.get("judge") or {}).get("resolved")
    if rejudged or (judge or None) != (pj or None):
        out.append(f"judge {judge} instead of the pre-registered {pj}")
    for k in FIELDS:
        a, b = getattr(cfg, k), pre.get(k)
        if a != b:
            out.append(f"{k.replace('_', ' ')} {a} instead of the pre-registered {b}")
    return out
