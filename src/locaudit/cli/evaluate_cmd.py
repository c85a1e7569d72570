"""`locaudit eval`: score one edit (none, ITI, optimal) with MC, KL/CE, held-out preferences, generation
and judges; writes result.json and appends a row to results.csv."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from locaudit.cli.options import (
    DType, data_option, device_option, dtype_option,
    format_option, max_questions_option, model_option, precision_option,
    seed_option, value,
)
from locaudit.cli import options as opt
from locaudit.models.precision import Precision

EXAMPLE = (
    "Examples:\n\n"
    "  locaudit eval --model smollm2-135m-instruct --data truthfulqa:$(locaudit data path truthfulqa-v1) "
    "--metrics mc,kl,ce,pref --split test --out runs/eval/baseline\n\n"
    "  locaudit eval --data truthfulqa:PATH.csv --iti runs/iti16 --alpha 15 --metrics all --judge NAME --out runs/eval/iti16"
)


def resolve_judge(name: str, data: str, split: str, seed: int = 0, max_questions: int | None = None,
                  device: str = "auto"):
    """A judge by name via locaudit.evaluate.judges.get_judge (disk-cached). For TruthfulQA data the
    judge gets the reference answers, and a judge trained on first use holds out the evaluation split."""
    from locaudit.errors import ConfigError

    try:
        from locaudit.evaluate.judges import get_judge
    except ImportError as e:
        raise ConfigError(f"--judge {name!r}: judges are unavailable in this install ({e})") from e
    kwargs: dict = {"device": device, "seed": seed, "max_questions": max_questions,
                    "holdout_splits": tuple(dict.fromkeys((split, "test")))}
    if data.startswith("truthfulqa:"):
        kwargs.update(references=data, holdout=data)
    return get_judge(name, **kwargs)


def evaluate(
    data: str = data_option(),
    out: Path = typer.Option(..., "--out", help="Folder for result.json, results.csv, generations.jsonl, "
                             "mc_items.jsonl, judgements.jsonl."),
    model: str = model_option(),
    edit: Optional[Path] = typer.Option(None, "--edit", help="A saved edit folder (ITI or optimal); "
                                        "none = the unedited model."),
    iti: Optional[Path] = typer.Option(None, "--iti", help="A saved ITI edit folder (same as --edit, "
                                       "with --alpha to change its strength)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", **opt.bounded("--alpha", opt.MAX_ALPHA), help="Override an ITI edit's saved alpha."),
    metrics: str = typer.Option("mc,kl,ce,pref,gen", "--metrics", help="Comma-separated subset of "
                                "mc,kl,ce,pref,gen, or all. kl and ce share one pass."),
    judge: Optional[str] = typer.Option(None, "--judge", help="Judge scoring the generations for True/Info "
                                        "(needs gen in --metrics): trained:DIR, hf:TRUTH,INFO, api:MODEL@URL, "
                                        "reference[:bleu|rouge1|rouge2|rougeL] default or default:small (see `locaudit judge`)."),
    split: str = typer.Option("test", "--split", help="Evaluation split: train, val or test."),
    fmt: str = format_option(),
    seed: int = seed_option(),
    max_questions: Optional[int] = max_questions_option(),
    batch_size: int = typer.Option(32, "--batch-size", **opt.count("--batch-size"), help="Sequences per forward pass when scoring."),
    gen_batch_size: int = typer.Option(16, "--gen-batch-size", **opt.count("--gen-batch-size"), help="Questions generated together."),
    max_new_tokens: int = typer.Option(50, "--max-new-tokens", **opt.count("--max-new-tokens"), help="Greedy tokens per answer at most."),
    max_length: int = typer.Option(512, "--max-length", **opt.count("--max-length", 8), help="Longest scored sequence in tokens."),
    protocol: str = typer.Option("iti", "--protocol", help="What goes before each question for generation and "
                                 "MC: iti (ITI's instruction prompt + TruthfulQA's six-shot QA primer, as ITI and "
                                 "the paper evaluate) or bare (nothing; locaudit's old protocol)."),
    kl_text: Optional[str] = typer.Option("austen", "--kl-text", help="Generic English text for KL/CE (the "
                                          "collateral damage ITI measures): austen (public-domain excerpts shipped "
                                          "with locaudit), austen-debian[:PATH] (the full novels from Debian's "
                                          "r-cran-janeaustenr) or a UTF-8 text file; 'answers' = the split's "
                                          "questions with their best answers (the old default)."),
    kl_answers: bool = typer.Option(True, "--kl-answers/--no-kl-answers", help="Also report KL/CE on the "
                                    "split's questions with their best answers (kl_answers, ce_answers)."),
    kl_max_tokens: Optional[int] = typer.Option(4096, "--kl-max-tokens", **opt.count("--kl-max-tokens", 2), help="At most this many tokens of the "
                                                "generic KL/CE text."),
    judge_threshold: float = typer.Option(0.5, "--judge-threshold", **opt.open_probability("--judge-threshold"), help="P(yes) at or above which the judge "
                                          "counts an answer as true / informative (ITI: 0.5); mean probabilities "
                                          "are reported too."),
    mc_primer: bool = typer.Option(False, "--mc-primer/--no-mc-primer", help="With --protocol bare: put "
                                   "TruthfulQA's six-shot QA primer before each MC prompt."),
    precision: Precision = precision_option(),
    csv: Optional[Path] = typer.Option(None, "--csv", help="CSV to append the result row to "
                                       "(default OUT/results.csv)."),
    dtype: DType = dtype_option(),
    device: str = device_option(),
    trust_remote_code: bool = opt.trust_remote_code_option(),
    json_out: bool = typer.Option(False, "--json", help="Print the whole result (result.json's content) as one "
                                  "strict JSON object instead of text."),
) -> None:
    """Evaluate an edit (or the unedited model) on one split with every asked-for metric."""
    # Long on purpose: most of its lines are its typer options, one per flag of `locaudit evaluate`; the body builds
    # the EvalConfig from them and evaluates.
    import json

    from locaudit.data.behaviour import load_behaviour
    from locaudit.edit.base import load_edit
    from locaudit.errors import ConfigError
    from locaudit.evaluate.runner import EvalConfig, evaluate_edit, parse_metrics
    from locaudit.models.loading import load_model

    if edit is not None and iti is not None:
        raise ConfigError("give --edit or --iti, not both")
    chosen = edit or iti
    if alpha is not None and chosen is None:
        raise ConfigError("--alpha needs --iti DIR (or --edit DIR of an ITI edit)")
    metric_list = parse_metrics(metrics)
    cfg = EvalConfig(format=fmt, batch_size=batch_size, gen_batch_size=gen_batch_size, max_new_tokens=max_new_tokens,
                     max_length=max_length, kl_text=None if kl_text in (None, "", "answers") else kl_text,
                     precision=value(precision), protocol=protocol, kl_answers=kl_answers,
                     kl_max_tokens=kl_max_tokens, judge_threshold=judge_threshold, mc_primer=mc_primer)
    the_edit = None
    if chosen is not None:
        the_edit = load_edit(chosen, alpha=alpha) if alpha is not None else load_edit(chosen)
        if iti is not None and the_edit.kind != "iti":
            raise ConfigError(f"--iti {iti}: the folder holds a {the_edit.kind!r} edit; use --edit")
    the_judge = resolve_judge(judge, data, split, seed, max_questions, device) if judge else None
    bd = load_behaviour(data, seed=seed, max_questions=max_questions)
    lm = load_model(model, dtype=value(dtype), device=device, trust_remote_code=trust_remote_code)
    res = evaluate_edit(lm, the_edit, bd, split, metric_list, the_judge, out, cfg, csv)
    keys = ("mc1", "mc2", "mc0", "kl", "ce", "kl_answers", "ce_answers", "pref_acc", "pref_margin", "true", "info",
            "true_info", "true_prob", "info_prob", "true_info_prob")
    import math

    bad = {k: getattr(res, k) for k in keys if isinstance(getattr(res, k), float) and not math.isfinite(getattr(res, k))}
    if bad:  # result.json holds them as null (strict JSON); the command fails, naming them and the likely cause
        raise ConfigError(f"eval: non-finite metric(s) {bad} for edit {res.edit!r}; likely cause: the edit's strength "
                          f"(--alpha {alpha}) or the model's dtype ({value(dtype)}); see {out / 'result.json'}")
    if json_out:
        from locaudit.io import strict_json

        typer.echo(json.dumps(strict_json(res.model_dump(mode="json")), allow_nan=False))
        return
    typer.echo(f"{res.split} split, {res.n_questions} questions, protocol {res.protocol}"
               + (f", KL/CE on {res.kl_text}" if res.kl_text else "") + f": edit {json.dumps(res.edit)}")
    for k in keys:
        v = getattr(res, k)
        if v is not None:
            se = getattr(res, f"{k}_se", None)
            typer.echo(f"  {k:<15} {v:.4f}" + (f" ± {se:.4f}" if isinstance(se, float) else ""))
    typer.echo(f"-> {out / 'result.json'}")


def register(app: typer.Typer) -> None:
    app.command("eval", help=(evaluate.__doc__ or "") + "\n\n" + EXAMPLE)(evaluate)
