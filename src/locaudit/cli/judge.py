"""`locaudit judge train|eval|score`: train locaudit's own truth/info judges without leakage, measure any
judge on the held-out judge data, and score answers with any judge."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional

import typer

from locaudit.cli.options import device_option, precision_option, value
from locaudit.cli import options as opt
from locaudit.models.precision import Precision

from locaudit.errors import ConfigError

log = logging.getLogger(__name__)

judge_app = typer.Typer(
    help=(
        "Judges of generated answers (probability truthful / informative).\n\n"
        "Judge specs: trained:DIR | hf:TRUTH_MODEL,INFO_MODEL | api:MODEL@BASE_URL or api:MODEL@BASE_URL#KEY_ENV | "
        "reference or reference:METRIC (bleu, rouge1, rouge2, rougeL) | default.\n\n"
        "Example:\n\n"
        "  locaudit judge train --kind both --holdout truthfulqa:$(locaudit data path truthfulqa) "
        "--holdout-split test --seed 0 --out runs/judge"
    ),
    no_args_is_help=True,
)

HOLDOUT_HELP = ("Behaviour spec of the evaluation data, truthfulqa:PATH.csv: the questions of --holdout-split "
                "under its seeded question-level split are held out (never trained on) and evaluated on.")


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        fr = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--fractions {text!r}: expected three comma-separated numbers, e.g. 0.6,0.2,0.2") from None
    if len(fr) != 3:
        raise ConfigError(f"--fractions {text!r}: expected three numbers (train, val, test)")
    return fr  # type: ignore[return-value]


def _data_paths(truth_data: Optional[Path], info_data: Optional[Path]) -> tuple[Optional[Path], Optional[Path]]:
    from locaudit.evaluate.judges.registry import judge_data_dir

    d = judge_data_dir()
    return (truth_data or (d / "finetune_truth.jsonl" if d else None),
            info_data or (d / "finetune_info.jsonl" if d else None))


def _kinds(kind: str) -> list[str]:
    if kind not in ("truth", "info", "both"):
        raise ConfigError(f"--kind {kind!r}: choose truth, info or both")
    return ["truth", "info"] if kind == "both" else [kind]


@judge_app.command("train")
def train(
    kind: str = typer.Option("both", "--kind", help="Which judge to train: truth, info or both."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="Frozen backbone whose hidden states are "
                              "the features (hub id, folder, .gguf or smollm2-135m-instruct)."),
    holdout: str = typer.Option(..., "--holdout", help=HOLDOUT_HELP),
    holdout_split: List[str] = typer.Option(["test"], "--holdout-split", help="Split(s) held out; repeat the "
                                            "option to hold out several (e.g. --holdout-split val --holdout-split test)."),
    seed: int = typer.Option(0, "--seed", **opt.seed_range("--seed"), help="Seed of the study's question-level split (use the study's)."),
    fractions: str = typer.Option("0.6,0.2,0.2", "--fractions", help="The study's train,val,test fractions."),
    max_questions: Optional[int] = typer.Option(None, "--max-questions", **opt.count("--max-questions"), help="The study's --max-questions, if "
                                                "it used one (a subset changes which questions are 'test')."),
    truth_data: Optional[Path] = typer.Option(None, "--truth-data", help="finetune_truth.jsonl (default: "
                                              "$LOCAUDIT_JUDGE_DATA, else truthfulqa/data under the data root: "
                                              "$LOCAUDIT_DATA, ../shared/data or the cache; see `locaudit data`)."),
    info_data: Optional[Path] = typer.Option(None, "--info-data", help="finetune_info.jsonl (same default)."),
    layers: str = typer.Option("3,6,9,12", "--layers", help="Backbone layers used as features (comma-separated)."),
    heads: str = typer.Option("logistic,mlp", "--heads", help="Head types tried on the validation questions."),
    batch_size: int = typer.Option(64, "--batch-size", **opt.count("--batch-size"), help="Backbone batch size for the feature pass."),
    precision: Precision = precision_option(),
    device: str = device_option(),
    trust_remote_code: bool = opt.trust_remote_code_option("the backbone's checkpoint"),
    threads: Optional[int] = typer.Option(None, "--threads", **opt.count("--threads"), help="torch CPU threads (1 is fastest on a busy "
                                          "machine)."),
    max_train_examples: Optional[int] = typer.Option(None, "--max-train-examples", **opt.count("--max-train-examples"), help="Cap on training "
                                                     "examples per judge (quick runs)."),
    out: Path = typer.Option(..., "--out", help="Folder for judge.json, judge.safetensors, report.json."),
) -> None:
    """Train truth/info judges on TruthfulQA's judge data, holding out every evaluation question, and report
    held-out accuracy on those questions."""
    import torch

    from locaudit.evaluate.judges.train import JudgeTrainConfig, train_judge

    if threads:
        torch.set_num_threads(threads)
    t_path, i_path = _data_paths(truth_data, info_data)
    try:
        cfg = JudgeTrainConfig(kinds=_kinds(kind), model=model, truth_data=t_path, info_data=i_path, holdout=holdout,
                               holdout_splits=holdout_split, seed=seed, fractions=_fractions(fractions),
                               max_questions=max_questions, layers=[int(x) for x in layers.split(",")],
                               heads=heads.split(","), batch_size=batch_size, precision=value(precision),
                               device=device, trust_remote_code=trust_remote_code,
                               max_train_examples=max_train_examples)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    report = train_judge(cfg, out)
    summary = {k: {"held_out_accuracy": round(r["held_out"]["accuracy"], 4), "n": r["held_out"]["n"],
                   "n_questions": r["n_heldout_questions"], "head": r["ref"]["selection"]["chosen"]}
               for k, r in report["kinds"].items()}
    typer.echo(json.dumps({"out": str(out), "held_out": summary, "seconds": report["total_seconds"]}, indent=2))


@judge_app.command("eval")
def evaluate(
    judge: str = typer.Option(..., "--judge", help="Judge spec, e.g. trained:runs/judge or reference:bleu."),
    holdout: str = typer.Option(..., "--holdout", help=HOLDOUT_HELP),
    holdout_split: List[str] = typer.Option(["test"], "--holdout-split", help="Split(s) evaluated on."),
    seed: int = typer.Option(0, "--seed", **opt.seed_range("--seed"), help="Seed of the question-level split."),
    fractions: str = typer.Option("0.6,0.2,0.2", "--fractions", help="train,val,test fractions."),
    max_questions: Optional[int] = typer.Option(None, "--max-questions", **opt.count("--max-questions"), help="The study's --max-questions."),
    truth_data: Optional[Path] = typer.Option(None, "--truth-data", help="finetune_truth.jsonl (labels)."),
    info_data: Optional[Path] = typer.Option(None, "--info-data", help="finetune_info.jsonl (labels)."),
    max_examples: Optional[int] = typer.Option(None, "--max-examples", **opt.count("--max-examples"), help="Seeded subset of held-out examples."),
    device: str = device_option(),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Use the judgement cache."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the metrics JSON here too."),
    trust_remote_code: bool = opt.trust_remote_code_option("an hf: judge's checkpoint"),
) -> None:
    """Accuracy of any judge on the labelled judge data of the held-out questions."""
    import random

    import torch

    from locaudit.evaluate.judges import get_judge
    from locaudit.evaluate.judges.data import load_holdout, load_judge_data
    from locaudit.evaluate.judges.train import classifier_metrics
    from locaudit.io import write_json_atomic

    fr = _fractions(fractions)
    h = load_holdout(holdout, holdout_split, seed, fr, max_questions)
    the_judge = get_judge(judge, cache=cache, holdout=holdout, holdout_splits=holdout_split, seed=seed,
                          fractions=fr, max_questions=max_questions, device=device, trust_remote_code=trust_remote_code)
    result: dict = {"judge": the_judge.name, "holdout": h.describe(), "kinds": {}}
    for kind, path in zip(("truth", "info"), _data_paths(truth_data, info_data)):
        if kind not in the_judge.kinds:
            continue
        if path is None:
            raise ConfigError(f"--{kind}-data: no judge data file given")
        ex = load_judge_data(path, kind)
        role = h.assign([e.question for e in ex])
        ex = [e for e in ex if role[e.question] == "held_out"]
        if max_examples is not None and len(ex) > max_examples:
            ex = random.Random(f"locaudit-judge-eval-{seed}").sample(ex, max_examples)
        scores = the_judge.score([e.question for e in ex], [e.answer for e in ex])
        keep = [i for i, s in enumerate(scores) if getattr(s, kind) is not None]
        p = torch.tensor([getattr(scores[i], kind) for i in keep])
        y = torch.tensor([float(ex[i].label) for i in keep])
        result["kinds"][kind] = dict(classifier_metrics(p, y), n_missing=len(ex) - len(keep))
    typer.echo(json.dumps(result, indent=2))
    if out is not None:
        write_json_atomic(out, result)


@judge_app.command("score")
def score(
    judge: str = typer.Option(..., "--judge", help="Judge spec (see `locaudit judge --help`)."),
    input: Path = typer.Option(..., "--input", help="JSONL with 'question' and 'answer' per line."),
    out: Path = typer.Option(..., "--out", help="JSONL written with question, answer, truth, info."),
    references: Optional[str] = typer.Option(None, "--references", help="truthfulqa:PATH.csv: reference answers "
                                             "(needed by reference and default judges)."),
    device: str = device_option(),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Use the judgement cache."),
    trust_remote_code: bool = opt.trust_remote_code_option("an hf: judge's checkpoint"),
) -> None:
    """Score (question, answer) pairs from a JSONL file with any judge."""
    from locaudit.errors import DataError
    from locaudit.evaluate.judges import get_judge
    from locaudit.io import read_jsonl, write_text_atomic

    rows = []
    for n, rec in read_jsonl(input):
        for fld in ("question", "answer"):
            if not isinstance(rec, dict) or not isinstance(rec.get(fld), str):
                raise DataError(f"{input}:{n}: field {fld!r} is missing or not a string")
        rows.append(rec)
    the_judge = get_judge(judge, cache=cache, references=references, holdout=references, device=device,
                          trust_remote_code=trust_remote_code)
    scores = the_judge.score([r["question"] for r in rows], [r["answer"] for r in rows])
    write_text_atomic(out, "".join(json.dumps({"question": r["question"], "answer": r["answer"], "truth": s.truth,
                                               "info": s.info, "judge": the_judge.name}) + "\n"
                                   for r, s in zip(rows, scores)))
    typer.echo(f"{len(rows)} answers scored by {the_judge.name} -> {out}")


@judge_app.command("audit")
def audit(
    judge: str = typer.Option(..., "--judge", help="Judge spec, e.g. default, trained:runs/judge, reference:bleu."),
    references: Optional[str] = typer.Option(None, "--references", help="truthfulqa:PATH.csv: reference answers "
                                             "(the trained judges' reference features, and TruthfulQA's BLEU/ROUGE "
                                             "acc shown beside the judge)."),
    audit_set: Optional[Path] = typer.Option(None, "--audit-set", help="Labelled JSONL (question, answer, truth, "
                                             "info); default: the set shipped with locaudit (225 answers of edited "
                                             "SmolLM2 models, rubric in evaluate/judges/audit/RUBRIC.md)."),
    holdout: Optional[str] = typer.Option(None, "--holdout", help="For --judge default: the evaluation data "
                                          "whose split is held out of its training (truthfulqa:PATH.csv)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for audit.json and reliability.png."),
    device: str = device_option(),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Use the judgement cache."),
    trust_remote_code: bool = opt.trust_remote_code_option("an hf: judge's checkpoint"),
) -> None:
    """How a judge does on answers that edited models actually give: accuracy, balanced accuracy and
    calibration (ECE) against labels read by hand, with TruthfulQA's BLEU/ROUGE acc beside it."""
    from locaudit.evaluate.judges import get_judge
    from locaudit.evaluate.judges.audit import audit_judge, format_audit, load_audit
    from locaudit.evaluate.judges.base import References
    from locaudit.evaluate.judges.calibration import reliability_diagram
    from locaudit.io import write_json_atomic

    items = load_audit(audit_set)
    refs = References.from_spec(references) if references else None
    the_judge = get_judge(judge, cache=cache, references=references, holdout=holdout or references, device=device,
                          trust_remote_code=trust_remote_code)
    report = audit_judge(the_judge, items, references=refs)
    typer.echo(format_audit(report))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "audit.json", report)
        curves = {}
        for k in report["kinds"]:
            rows = [(r[f"p_{k}"], getattr(it, k)) for r, it in zip(report["answers"], items) if r[f"p_{k}"] is not None]
            curves[k] = ([p for p, _ in rows], [y for _, y in rows])
        reliability_diagram(curves, out / "reliability.png", title=f"audit: {the_judge.name}")
        typer.echo(f"-> {out / 'audit.json'}, {out / 'reliability.png'}")


def register(app: typer.Typer) -> None:
    app.add_typer(judge_app, name="judge")
