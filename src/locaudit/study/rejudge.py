"""Re-score a study's answers with another judge: does the verdict depend on the judge?

Every finished trial keeps its greedy answers (`eval/generations.jsonl`). `rejudge_rows` scores them all
with another judge in batched calls over chunks of trials (a (question, answer) pair that several trials share
is scored once), writes each trial's judgements to `RUN/rejudged/<judge slug>/<trial key>.jsonl` as its chunk
ends (kept: a second report with the same judge scores nothing, and a stopped one goes on from there), and
returns the ledger rows with True, Info and True*Info recomputed exactly as the evaluation computes them
(`EvalResult.set_judged`, at the trial's threshold). The report then reads the new judgements per question
(`analysis.load_per_question` follows `artifacts["judgements"]`). MC, KL, CE and preferences do not use a judge
and are unchanged.

This asks how much the conclusion rests on one judge (e.g. locaudit's default judge, whose features come
from the model under study, against one on another backbone, or an API judge). Agreement between two
judges is not evidence that either is right; the audit set (docs/evaluation.md) measures that.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from locaudit.errors import DataError
from locaudit.io import read_jsonl, strict_json, write_text_atomic

log = logging.getLogger(__name__)

JUDGED = ("true", "info", "true_info", "true_info_per_q", "true_prob", "info_prob", "true_info_prob")


def judge_slug(name: str) -> str:
    """A folder name for a judge: its name's safe characters and a short hash of the full name."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:40] or "judge"
    return f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


class _Questions:
    """qid -> question text, loaded once and only if a saved answer lacks its question (a pack's: pack_text.py)."""

    def __init__(self, load: Callable[[], Mapping[str, str]] | None) -> None:
        self._load, self._map = load, None

    def get(self, qid: str, path: Path, line: int) -> str:
        if self._load is None:
            raise DataError(f"{path} line {line}: the answer has no question (a pack's answers keep only its qid) "
                            "and no data was given to look it up")
        if self._map is None:
            self._map = dict(self._load())
        q = self._map.get(qid)
        if not isinstance(q, str):
            raise DataError(f"{path} line {line}: question {qid!r} is not in the study's data; is LOCAUDIT_DATA "
                            "(or the study's data path) the file the run was scored on?")
        return q


def _generations(run_dir: Path, row: dict, questions: _Questions) -> list[dict] | None:
    ev = (row.get("artifacts") or {}).get("eval")
    if row.get("status") != "done" or not ev:
        return None
    path = run_dir / ev / "generations.jsonl"
    if not path.is_file():
        return None
    try:
        recs = [rec for _, rec in read_jsonl(path)]
    except Exception as e:
        raise DataError(f"{path}: unreadable generations ({e}); re-run that trial or leave it out") from e
    for i, rec in enumerate(recs):
        if not (isinstance(rec, dict) and all(isinstance(rec.get(f), str) for f in ("qid", "answer"))):
            raise DataError(f"{path} line {i + 1}: needs string fields qid and answer (and question, or the "
                            "study's data to look it up)")
        if not isinstance(rec.get("question"), str):
            rec["question"] = questions.get(rec["qid"], path, i + 1)
    return recs


def study_questions(study: Any) -> dict[str, str]:
    """{qid: question} of every question of a study's data (a StudySpec), whatever its split."""
    from locaudit.data.behaviour import load_behaviour

    d = study.data
    data = load_behaviour(study.resolved_data_spec(), seed=d.seed, fractions=d.fractions,
                          mc_path=study.resolved_mc_path())
    return {q.qid: q.question for q in data.all_questions}


def judges_used(run_dir: str | Path, rows: Sequence[dict]) -> dict[str, int]:
    """{judge identity: number of finished trials} over the trials whose evaluation was judged, as each trial's
    eval/result.json names its judge (a trained judge's name carries a hash of its weights). More than one entry
    means True/Info mix judges: a run carried across machines, each of which trained the default judge anew."""
    out: dict[str, int] = {}
    for r in rows:
        ev = (r.get("artifacts") or {}).get("eval") if r.get("status") == "done" else None
        path = Path(run_dir) / ev / "result.json" if ev else None
        if path is None or not path.is_file():
            continue
        try:
            name = json.loads(path.read_text(encoding="utf-8")).get("judge")
        except (OSError, ValueError, AttributeError):
            continue
        if name:
            out[str(name)] = out.get(str(name), 0) + 1
    return out


def _chunks(keys: list[str], gens: Mapping[str, list[dict]], size: int) -> list[list[str]]:
    """`keys` in order, cut into runs of trials holding about `size` answers each (a trial is never split)."""
    out: list[list[str]] = []
    n = 0
    for k in keys:
        if not out or n >= size:
            out.append([])
            n = 0
        out[-1].append(k)
        n += len(gens[k])
    return out


def rejudge_rows(run_dir: str | Path, rows: Sequence[dict], judge: Any, progress: bool = True,
                 questions: Callable[[], Mapping[str, str]] | None = None,
                 chunk_answers: int = 512) -> tuple[list[dict], dict[str, Any]]:
    """(rows with judge metrics recomputed by `judge`, a summary {judge, slug, trials, answers, scored}).

    Rows without saved generations (not finished, no `gen` metric) are returned unchanged. `judge` is any
    object with `name` and `score(questions, answers) -> [JudgeScore | dict]` (locaudit.evaluate.judges).
    `questions`: called (once, if needed) for {qid: question} where a saved answer has no question (a pack's).
    `chunk_answers`: the trials are scored in chunks of about this many answers, each trial's judgements written as
    its chunk ends, so that a re-judge stopped part way keeps what it scored (a distinct answer is scored once).
    """
    from locaudit.evaluate.results import EvalResult
    from locaudit.evaluate.runner import judge_values
    from locaudit.study.steps.evaluation import flatten_metrics

    run_dir = Path(run_dir)
    name = str(getattr(judge, "name", type(judge).__name__))
    slug = judge_slug(name)
    folder = run_dir / "rejudged" / slug
    qs = _Questions(questions)
    gens = {r["key"]: g for r in rows if (g := _generations(run_dir, r, qs))}
    cached: dict[str, list[dict]] = {}
    for key in gens:
        p = folder / f"{key}.jsonl"
        if p.is_file():
            try:
                recs = [rec for _, rec in read_jsonl(p)]
                if [x.get("qid") for x in recs] == [g["qid"] for g in gens[key]]:
                    cached[key] = recs
            except Exception:  # a damaged cache file is re-scored
                pass
    todo = [k for k in gens if k not in cached]
    n_pairs = len(dict.fromkeys((g["question"], g["answer"]) for k in todo for g in gens[k]))
    scores: dict[tuple[str, str], tuple[float | None, float | None]] = {}
    if n_pairs:
        log.info("re-scoring %d distinct answers of %d trials with judge %s", n_pairs, len(todo), name)
    # in chunks of trials, each trial's judgements written as its chunk ends: a stopped re-judge keeps what it scored
    for chunk in _chunks(todo, gens, chunk_answers):
        pairs = list(dict.fromkeys((g["question"], g["answer"]) for k in chunk for g in gens[k]
                                   if (g["question"], g["answer"]) not in scores))
        if pairs:
            raw = judge.score([q for q, _ in pairs], [a for _, a in pairs])
            truth, info = judge_values(raw, len(pairs), name)
            scores.update({p: (t, i) for p, t, i in zip(pairs, truth, info)})
        for key in chunk:
            recs = [{"qid": g["qid"], "answer": g["answer"], "truth": scores[(g["question"], g["answer"])][0],
                     "info": scores[(g["question"], g["answer"])][1]} for g in gens[key]]
            folder.mkdir(parents=True, exist_ok=True)
            write_text_atomic(folder / f"{key}.jsonl", "".join(json.dumps(strict_json(x), allow_nan=False) + "\n"
                                                               for x in recs))
            cached[key] = recs
    out = []
    for r in rows:
        if r["key"] not in cached:
            out.append(r)
            continue
        r = copy.deepcopy(r)
        metrics = dict(r.get("metrics") or {})
        thr = metrics.get("judge_threshold")
        thr = float(thr) if isinstance(thr, (int, float)) and 0 < float(thr) < 1 else 0.5
        res = EvalResult(model="", split="")
        recs = cached[r["key"]]
        res.set_judged([x["truth"] for x in recs], [x["info"] for x in recs], name, thr)
        fresh = flatten_metrics(res)
        for k in list(metrics):
            if k.split("_se")[0] in JUDGED:
                metrics.pop(k)
        metrics.update({k: v for k, v in fresh.items() if k.split("_se")[0] in JUDGED})
        r["metrics"] = metrics
        r["artifacts"] = {**(r.get("artifacts") or {}), "judgements": str((folder / f"{r['key']}.jsonl").relative_to(run_dir))}
        out.append(r)
    summary = {"judge": name, "slug": slug, "trials": len(cached), "answers": sum(len(v) for v in cached.values()),
               "scored": len(scores)}
    return out, summary


def study_judge(spec: Any, judge_spec: str, device: str = "auto"):
    """The judge named `judge_spec`, set up as the study's own (study/judge.py: reference answers of its
    TruthfulQA file; a judge trained by locaudit holds out the splits the study judges, of exactly its data
    split). `spec`: a StudySpec or the run's recorded spec (its ledger's meta)."""
    from locaudit.study.judge import build_judge
    from locaudit.study.spec import spec_of_run

    return build_judge(spec_of_run(spec), judge_spec, device=device)


__all__ = ["rejudge_rows", "judge_slug", "study_judge", "study_questions", "JUDGED"]
