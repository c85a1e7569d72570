"""`evaluate_edits`: many edits evaluated together, each with the numbers `evaluate_edit` gives it alone.

What is shared (the per-edit path runs each of these once per edit):
  - MC (evaluate/shared_mc.py): the unedited model runs ITI's primer, every question's prompt and its answers
    once (KV caches and the states entering each edit's lowest layer); each edit then runs only the layers
    from its lowest edited layer L up, on KV caches grafted from the unedited ones below L. The unedited
    model (None / NoEdit, ITI at alpha 0) costs nothing beyond that pass; single-head edits at layer L cost
    (n_layers - L) / n_layers of a full evaluation.
  - KL/CE (evaluate/shared_klce.py): each batch of text runs once unedited up to the highest L needed.
  - Generation (evaluate/shared_gen.py): the optimal (LoRA) edits and the unedited model generate
    `gen_edits_together` at a time, one block of each question batch per edit, so each decoding step reads the
    weights once for all of them; the judge then scores each edit's answers.
  - Other metrics (pref, ab) run per edit through `evaluate_edit`.
Edits of kinds other than none/iti/lora, and families whose registry card lacks the frozen-prefix path, run
all layers (L = 0) inside the same loops: correct, not faster.

Agreement with `evaluate_edit` (tests/unit/test_shared_eval.py): the same tokens, batches and KV caches; the
layers below L compute exactly what the edited model computes there, so the values agree up to float
rounding (different matmul shapes in the final log-softmax chunks).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

from locaudit.edit.base import Edit
from locaudit.errors import ConfigError, DataError
from locaudit.evaluate.results import EvalResult
from locaudit.evaluate.runner import (EvalConfig, evaluate_edit, parse_metrics, record_result, result_header,
                                      write_mc_items)
from locaudit.evaluate.upper import grafts_supported, lowest_layer
from locaudit.models.loading import LoadedModel
from locaudit.models.precision import resolve_precision

log = logging.getLogger(__name__)

SHARED_METRICS = ("mc", "kl", "ce")


def evaluate_edits(
    lm: LoadedModel,
    edits: Sequence[Edit | None],
    data: Any,
    split: str = "test",
    metrics: str | Sequence[str] = ("mc", "kl", "ce"),
    judge: Any = None,
    out_dirs: Sequence[str | Path | None] | None = None,
    config: EvalConfig | None = None,
    csv_path: str | Path | None = None,
) -> list[EvalResult]:
    """`[evaluate_edit(lm, e, data, split, metrics, judge, out_dirs[i], config, csv_path) for e in edits]`,
    computed together (module doc). `edits`: Edit objects as loaded from disk (LoRAEdit, ITIEdit, None for
    the unedited model). `out_dirs`: one folder (or None) per edit; `csv_path`: one row per edit appended.
    `res.seconds["mc"]` / `["klce"]`: the shared time divided by the number of edits."""
    edits = list(edits)
    if out_dirs is not None and len(out_dirs) != len(edits):
        raise ConfigError(f"evaluate_edits: {len(out_dirs)} out_dirs for {len(edits)} edits")
    cfg = config or EvalConfig()
    metrics = parse_metrics(metrics)
    outs = [Path(o) if o is not None else None for o in (out_dirs or [None] * len(edits))]
    if not edits:
        return []
    if not grafts_supported(lm):
        log.warning("%s: its KV cache cannot be shared across edits; evaluating each edit alone", lm.name)
        return [evaluate_edit(lm, e, data, split, metrics, judge, o, cfg, csv_path) for e, o in zip(edits, outs)]
    prec = resolve_precision(cfg.precision, lm.device)
    fmt = cfg.prompt_format
    layers = [lowest_layer(lm, e) for e in edits]
    rest = [m for m in metrics if m not in SHARED_METRICS]
    gens, gen_share = _generations(lm, edits, data, split, cfg, prec) if "gen" in rest else ([None] * len(edits), 0.0)
    results = []
    for e, o, g in zip(edits, outs, gens):
        if o is not None:
            o.mkdir(parents=True, exist_ok=True)
        if rest:  # per edit: preferences, A/B, and the judge of the generations
            r = evaluate_edit(lm, e, data, split, rest, judge, o, cfg, write_result=False, generations=g)
            if g is not None:
                r.seconds["gen"] = gen_share
        else:
            r = result_header(lm, e, data, split, fmt, rest, len(data.questions(split)), prec)
            if judge is not None:
                log.warning("a judge was given but 'gen' is not among the metrics: True/Info not computed")
        r.metrics = list(metrics)
        results.append(r)
    from locaudit.evaluate.generate import context_limit

    max_len = context_limit(lm, cfg.max_length)
    if "mc" in metrics:
        _mc(lm, edits, layers, data, split, cfg, max_len, prec, results, outs)
    if "kl" in metrics or "ce" in metrics:
        _klce(lm, edits, layers, data, split, cfg, max_len, prec, results)
    for r, o in zip(results, outs):
        record_result(r, o, csv_path)
    return results


def _generations(lm, edits, data, split, cfg, prec) -> tuple[list, float]:
    """Every edit's generated answers (evaluate/shared_gen.generate_many) and the time per edit."""
    from locaudit.evaluate.generate import context_limit
    from locaudit.evaluate.runner import gen_subset
    from locaudit.evaluate.shared_gen import generate_many

    t0 = time.perf_counter()
    questions = gen_subset(data.questions(split), cfg.gen_max_questions)
    gens = generate_many(lm, edits, questions, cfg.prompt_format, cfg.max_new_tokens, cfg.gen_batch_size,
                         precision=prec, max_length=context_limit(lm, cfg.max_length),
                         edits_together=cfg.gen_edits_together, progress=cfg.progress)
    return gens, round((time.perf_counter() - t0) / len(edits), 3)


def _mc(lm, edits, layers, data, split, cfg, max_len, prec, results, outs) -> None:
    """MC fields of every result (as runner.evaluate_edit's MC block)."""
    from locaudit.evaluate.mc import TRUTHFULQA_QA_PRIMER
    from locaudit.evaluate.shared_mc import shared_score_mc

    t0 = time.perf_counter()
    fmt = cfg.prompt_format
    items = data.mc_items(split)
    if not items:
        log.warning("data %r has no MC items in split %r: MC skipped", getattr(data, "name", ""), split)
        for r in results:
            r.n_mc = 0
        return
    primer = cfg.mc_primer and fmt.protocol == "bare"
    mcs = shared_score_mc(lm, edits, items, fmt, TRUTHFULQA_QA_PRIMER if primer else "", cfg.batch_size, max_len,
                          precision=prec, layers=layers)
    for r, o, mc in zip(results, outs, mcs):
        r.mc_prefix = fmt.protocol if fmt.protocol != "bare" else ("primer" if primer else "none")
        for k, v in mc.summary().items():
            setattr(r, k, v)
        if o is not None:
            write_mc_items(o / "mc_items.jsonl", mc)
    share = round((time.perf_counter() - t0) / len(edits), 3)
    for r in results:
        r.seconds["mc"] = share


def _klce(lm, edits, layers, data, split, cfg, max_len, prec, results) -> None:
    """KL/CE fields of every result (as runner.evaluate_edit's KL/CE block)."""
    from locaudit.evaluate.klce import heldout_texts, tokenize
    from locaudit.evaluate.shared_klce import shared_kl_ce
    from locaudit.evaluate.texts import corpus_windows, load_corpus

    t0 = time.perf_counter()
    fmt = cfg.prompt_format
    questions = data.questions(split)
    answers = None
    if cfg.kl_answers or not cfg.kl_text:
        if not questions:
            raise DataError(f"split {split!r} of {getattr(data, 'name', '')!r} has no questions for KL/CE on its answers")
        ids = tokenize(lm.tokenizer, heldout_texts(questions, fmt.bare(), lm.tokenizer), max_len)
        answers = shared_kl_ce(lm, edits, layers, ids, cfg.batch_size, precision=prec, progress=cfg.progress)
        for r, a in zip(results, answers):
            r.kl_answers, r.kl_answers_se, r.ce_answers, r.ce_answers_se = a.kl, a.kl_se, a.ce, a.ce_se
            r.n_kl_answers_tokens = a.n_tokens
    if cfg.kl_text:
        corpus = load_corpus(cfg.kl_text)
        ids = corpus_windows(corpus, lm.tokenizer, max_len, cfg.kl_max_tokens)
        main = shared_kl_ce(lm, edits, layers, ids, cfg.batch_size, precision=prec, progress=cfg.progress)
        name, fp = corpus.name, corpus.fingerprint
    else:
        main, name, fp = answers, "answers", getattr(data, "fingerprint", "") or None
    share = round((time.perf_counter() - t0) / len(edits), 3)
    for r, m in zip(results, main):
        r.kl_text, r.kl_text_fingerprint = name, fp
        for k, v in m.summary().items():
            setattr(r, k, v)
        r.seconds["klce"] = share


__all__ = ["evaluate_edits", "SHARED_METRICS"]
