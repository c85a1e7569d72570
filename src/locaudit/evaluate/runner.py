"""`evaluate_edit`: score one edit (none, ITI, optimal) on one split with every asked-for metric.

Every metric runs the model through the same edited view (view.py), so different kinds of edit are
compared on equal terms. Outputs in `out_dir`: result.json, a row appended to results.csv,
generations.jsonl, mc_items.jsonl and judgements.jsonl (where computed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, Field, model_validator

from locaudit.data.prompts import PromptFormat
from locaudit.edit.base import Edit
from locaudit.errors import ConfigError, DataError
from locaudit.evaluate.results import EvalResult
from locaudit.evaluate.view import describe
from locaudit.io import write_text_atomic
from locaudit.models.loading import LoadedModel
from locaudit.models.precision import PrecisionName, migrate_autocast_field, resolve_precision

log = logging.getLogger(__name__)

METRICS = ("mc", "kl", "ce", "pref", "gen", "ab")


class EvalConfig(BaseModel):
    """How to evaluate (the what: edit, data, split, metrics, judge, are evaluate_edit's arguments)."""

    format: Literal["plain", "chat"] = Field("plain", description="Prompt format for every metric.")
    protocol: Literal["iti", "bare"] = Field("iti", description="What goes before each question when generating "
                                             "and scoring MC: iti = ITI's instruction prompt + TruthfulQA's six-shot "
                                             "QA primer (ITI's and the paper's protocol); bare = nothing (locaudit "
                                             "before issue 11). Preference scoring and answer-text KL stay bare.")
    batch_size: int = Field(32, ge=1, description="Sequences per forward pass when scoring.")
    gen_batch_size: int = Field(16, ge=1, description="Questions generated together.")
    gen_edits_together: int = Field(8, ge=1, description="Edits generated in one batch when many are evaluated together "
                                    "(the optimal LoRA edits and the unedited model; gen_batch_size questions each; "
                                    "evaluate/shared_gen.py).")
    max_new_tokens: int = Field(50, ge=1, description="Greedy tokens per generated answer at most.")
    gen_max_questions: int | None = Field(None, ge=1, description="Generate and judge only N of the split's "
                                          "questions (MC, KL and CE still use all of them): True*Info as a cheaper "
                                          "secondary metric. The N are fixed by question id (the lowest SHA-256 "
                                          "hashes), the same for every edit and every run, whatever the split's order.")
    max_length: int = Field(512, ge=8, description="Longest scored sequence in tokens (prompt cut from the left).")
    kl_text: str | None = Field("austen", description="Generic English text for KL/CE (collateral damage, as ITI): a "
                                "corpus name (austen: public-domain excerpts shipped with locaudit; austen-debian"
                                "[:PATH]: the full novels from Debian's r-cran-janeaustenr) or a UTF-8 text file. "
                                "None: KL/CE on the split's questions + best answers only (the old default).")
    kl_answers: bool = Field(True, description="Also report KL/CE on the split's questions + best answers "
                             "(kl_answers, ce_answers): the text IPO up-weights, a second, labelled metric.")
    kl_max_tokens: int | None = Field(4096, ge=2, description="At most this many tokens of the generic KL/CE text "
                                      "(documents contribute windows in turn); None = all of it.")
    judge_threshold: float = Field(0.5, gt=0, lt=1, description="A judge's P(yes) at or above which an answer "
                                   "counts as true / informative (ITI: 0.5).")
    precision: PrecisionName = Field("auto", description="Compute precision: auto (bf16 on GPUs and on CPUs where "
                                     "bf16 is measured faster, else fp32), fp32, bf16 or fp16.")
    mc_primer: bool = Field(False, description="Protocol bare only: put TruthfulQA's six-shot QA primer before "
                            "each MC prompt (the iti protocol already has it).")
    progress: bool = Field(True, description="Show progress bars.")

    @model_validator(mode="before")
    @classmethod
    def _old_autocast(cls, data):
        """The old field `autocast: none|bf16|fp16` keeps loading, as `precision`."""
        return migrate_autocast_field(data, "EvalConfig")

    @property
    def prompt_format(self) -> PromptFormat:
        return PromptFormat(self.format, protocol=self.protocol)


def parse_metrics(metrics: str | Sequence[str]) -> tuple[str, ...]:
    """'mc,kl' or a list -> validated tuple; 'all' means every metric."""
    items = [m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    if items == ["all"]:
        return METRICS
    bad = [m for m in items if m not in METRICS]
    if bad or not items:
        raise ConfigError(f"metrics {bad or items!r}: choose from {', '.join(METRICS)} (comma-separated) or 'all'")
    return tuple(dict.fromkeys(items))


def judge_values(scores: Sequence[Any], n: int, name: str) -> tuple[list[float | None], list[float | None]]:
    """Per-answer (truth, info) from JudgeScore-like objects or dicts; None where the judge does not score it."""
    if len(scores) != n:
        raise DataError(f"judge {name!r} returned {len(scores)} scores for {n} answers")
    truth: list[float | None] = []
    info: list[float | None] = []
    for i, s in enumerate(scores):
        pair = []
        for kind in ("truth", "info"):
            v = s.get(kind) if isinstance(s, dict) else getattr(s, kind, None)
            if v is not None and not (0.0 <= float(v) <= 1.0):
                raise DataError(f"judge {name!r} score {i} = {s!r}: {kind} must be a probability in [0, 1]")
            pair.append(None if v is None else float(v))
        truth.append(pair[0])
        info.append(pair[1])
    return truth, info


def _timed(res: EvalResult, name: str, t0: float) -> None:
    """Record the seconds since `t0` that metric `name` took."""
    res.seconds[name] = round(time.perf_counter() - t0, 3)


def _score_mc(lm: LoadedModel, edit: Edit | None, data: Any, split: str, cfg: EvalConfig, fmt: Any, ac: Any,
              max_len: int, out: Path | None, res: EvalResult) -> None:
    """Multiple choice (MC1/MC2) on the split's MC items, into `res` (and out/mc_items.jsonl)."""
    from locaudit.evaluate.mc import TRUTHFULQA_QA_PRIMER, score_mc

    t0 = time.perf_counter()
    items = data.mc_items(split)
    if not items:
        log.warning("data %r has no MC items in split %r: MC skipped", res.data, split)
        res.n_mc = 0
    else:
        primer = cfg.mc_primer and fmt.protocol == "bare"
        res.mc_prefix = fmt.protocol if fmt.protocol != "bare" else ("primer" if primer else "none")
        mc = score_mc(lm, edit, items, fmt, TRUTHFULQA_QA_PRIMER if primer else "", cfg.batch_size,
                      max_len, precision=ac)
        for k, v in mc.summary().items():
            setattr(res, k, v)
        if out is not None:
            write_mc_items(out / "mc_items.jsonl", mc)
    _timed(res, "mc", t0)


def _score_klce(lm: LoadedModel, edit: Edit | None, data: Any, split: str, questions: Sequence[Any], cfg: EvalConfig,
                fmt: Any, ac: Any, max_len: int, res: EvalResult) -> None:
    """KL to the unedited model and cross-entropy, on the split's answers and/or a held-out text, into `res`."""
    from locaudit.evaluate.klce import heldout_texts, kl_ce
    from locaudit.evaluate.texts import corpus_windows, load_corpus

    t0 = time.perf_counter()
    answers = None
    if cfg.kl_answers or not cfg.kl_text:
        if not questions:
            raise DataError(f"split {split!r} of {res.data!r} has no questions for KL/CE on its answers")
        answers = kl_ce(lm, edit, heldout_texts(questions, fmt.bare(), lm.tokenizer), batch_size=cfg.batch_size,
                        max_length=max_len, precision=ac, progress=cfg.progress)
        res.kl_answers, res.kl_answers_se = answers.kl, answers.kl_se
        res.ce_answers, res.ce_answers_se = answers.ce, answers.ce_se
        res.n_kl_answers_tokens = answers.n_tokens
    if cfg.kl_text:
        corpus = load_corpus(cfg.kl_text)
        r = kl_ce(lm, edit, ids=corpus_windows(corpus, lm.tokenizer, max_len, cfg.kl_max_tokens),
                  batch_size=cfg.batch_size, precision=ac, progress=cfg.progress)
        res.kl_text, res.kl_text_fingerprint = corpus.name, corpus.fingerprint
    else:
        r = answers
        res.kl_text, res.kl_text_fingerprint = "answers", getattr(data, "fingerprint", "") or None
    for k, v in r.summary().items():
        setattr(res, k, v)
    _timed(res, "klce", t0)


def _score_gen(lm: LoadedModel, edit: Edit | None, questions: Sequence[Any], judge: Any, cfg: EvalConfig, fmt: Any,
               ac: Any, max_len: int, out: Path | None, res: EvalResult, recs: Sequence[Any] | None = None) -> None:
    """Generated answers (out/generations.jsonl) and, with a judge, their True/Info scores, into `res`.
    `recs`: this edit's answers generated already (evaluate/shared_gen.py, with the time set by the caller)."""
    from locaudit.evaluate.generate import generate_answers, save_generations

    t0 = time.perf_counter()
    if recs is None:
        recs = generate_answers(lm, edit, gen_subset(questions, cfg.gen_max_questions), fmt, cfg.max_new_tokens,
                                cfg.gen_batch_size,
                                out_path=out / "generations.jsonl" if out is not None else None,
                                progress=cfg.progress, precision=ac, max_length=max_len)
        _timed(res, "gen", t0)
    elif out is not None:
        save_generations(recs, out / "generations.jsonl")
    res.n_generated = len(recs)
    if judge is not None and recs:
        t0 = time.perf_counter()
        name = str(getattr(judge, "name", type(judge).__name__))
        scores = judge.score([r.question for r in recs], [r.answer for r in recs])
        truth, info = judge_values(scores, len(recs), name)
        res.set_judged(truth, info, name, cfg.judge_threshold)
        if out is not None:
            write_text_atomic(out / "judgements.jsonl", "".join(
                json.dumps({"qid": r.qid, "answer": r.answer, "truth": t, "info": i}, ensure_ascii=False) + "\n"
                for r, t, i in zip(recs, truth, info)))
        _timed(res, "judge", t0)


def evaluate_edit(
    lm: LoadedModel,
    edit: Edit | None,
    data: Any,
    split: str = "test",
    metrics: str | Sequence[str] = ("mc", "kl", "ce", "pref", "gen"),
    judge: Any = None,
    out_dir: str | Path | None = None,
    config: EvalConfig | None = None,
    csv_path: str | Path | None = None,
    *, write_result: bool = True,
    generations: Sequence[Any] | None = None,
) -> EvalResult:
    """Evaluate `edit` on `data` (a BehaviourData) for `split`; returns (and, with out_dir, writes) an EvalResult.

    `judge`: any object with `score(questions, answers) -> [JudgeScore(truth, info)]` and `name`; used on
    the generations when "gen" is among the metrics. `write_result=False`: out_dir gets the per-metric files
    (generations, judgements, MC items) but not result.json / results.csv (evaluate/shared.py merges results
    of several metrics computed apart and writes those itself). `generations`: the edit's GenerationRecords on
    `gen_subset(questions, gen_max_questions)`, generated already (evaluate/shared.py batches them across edits).
    """
    cfg = config or EvalConfig()
    metrics = parse_metrics(metrics)
    prec = resolve_precision(cfg.precision, lm.device)
    fmt, ac = cfg.prompt_format, prec
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    questions = data.questions(split)
    from locaudit.evaluate.generate import context_limit

    max_len = context_limit(lm, cfg.max_length)  # a model's context caps every scored sequence
    res = result_header(lm, edit, data, split, fmt, metrics, len(questions), prec)

    if "mc" in metrics:
        _score_mc(lm, edit, data, split, cfg, fmt, ac, max_len, out, res)

    if "kl" in metrics or "ce" in metrics:
        _score_klce(lm, edit, data, split, questions, cfg, fmt, ac, max_len, res)

    if "pref" in metrics:
        from locaudit.evaluate.preferences import score_preferences

        t0 = time.perf_counter()
        p = score_preferences(lm, edit, data.pairs(split), fmt.bare(), cfg.batch_size, max_len, precision=ac)
        for k, v in p.summary().items():
            setattr(res, k, v)
        _timed(res, "pref", t0)

    if "ab" in metrics:  # CAA's A/B behaviour metric (evaluate/ab.py)
        from locaudit.evaluate.ab import score_ab, with_ab_fields

        t0 = time.perf_counter()
        res = with_ab_fields(res)
        for k, v in score_ab(lm, edit, data.pairs(split), fmt.bare(), cfg.batch_size, max_len,
                            precision=ac).summary().items():
            setattr(res, k, v)
        _timed(res, "ab", t0)

    if "gen" in metrics:
        _score_gen(lm, edit, questions, judge, cfg, fmt, ac, max_len, out, res, generations)
    elif judge is not None:
        log.warning("a judge was given but 'gen' is not among the metrics: True/Info not computed")

    if write_result:
        record_result(res, out, csv_path)
    return res


def gen_subset(questions: Sequence[Any], n: int | None) -> list:
    """The `n` questions generation runs on (all where n is None or not smaller): those whose qid has the lowest
    SHA-256, in the split's order. Fixed by the ids alone, so every edit, run and split order gets the same
    questions, and a category-sorted file (TruthfulQA's) gives a spread of categories, not its first ones."""
    questions = list(questions)
    if n is None or n >= len(questions):
        return questions
    keep = set(sorted(range(len(questions)), key=lambda i: hashlib.sha256(str(questions[i].qid).encode()).hexdigest())[:n])
    return [q for i, q in enumerate(questions) if i in keep]


def record_result(res: EvalResult, out: Path | None, csv_path: str | Path | None = None) -> None:
    """out/result.json and a row of results.csv (csv_path, else out/results.csv)."""
    if out is not None:
        res.save_json(out / "result.json")
        res.append_csv(csv_path or out / "results.csv")
    elif csv_path is not None:
        res.append_csv(csv_path)


def result_header(lm: LoadedModel, edit: Edit | None, data: Any, split: str, fmt: PromptFormat,
                  metrics: Sequence[str], n_questions: int, prec) -> EvalResult:
    """An EvalResult with what identifies the evaluation and no metric values yet."""
    return EvalResult(edit=describe(edit), model=lm.name, model_fingerprint=lm.fingerprint,
                      data=getattr(data, "name", ""), data_fingerprint=getattr(data, "fingerprint", ""),
                      split=split, format=fmt.kind, protocol=fmt.protocol, metrics=list(metrics),
                      n_questions=n_questions, precision=prec.name, cpu_capability=prec.meta()["cpu_capability"])


def write_mc_items(path: Path, mc) -> None:
    """mc_items.jsonl: one line per question (MC1, MC2, MC0 and the answers' log-probs) of an MCResult."""
    write_text_atomic(path, "".join(
        json.dumps({"qid": s.qid, "mc1": s.mc1, "mc2": s.mc2, "mc0": s.mc0, "logprobs": s.logprobs},
                   ensure_ascii=False) + "\n" for s in mc.items))
