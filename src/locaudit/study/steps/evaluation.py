"""Score an edit the way the trial says: the metrics, split, subsample and protocol in its `Evaluation`.

A trial's `evaluation` (study/payloads.Evaluation) holds everything that defines the numbers (metrics, judge,
split, max_questions, and every EvalConfig field the study sets, such as max_new_tokens, in `config`); the
study's execution settings (batch sizes) come from the spec and never change a result. A 'select' trial scores
another trial's edit on the validation split with the same protocol (`score_split`), for the nested choice of
grid points.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from locaudit.io import stable_hash, write_json_atomic
from locaudit.study.payloads import Evaluation
from locaudit.study.steps.context import RunContext

log = logging.getLogger(__name__)


def _config(ctx: RunContext, ev: Evaluation):
    """The EvalConfig of a trial: its evaluation's EvalConfig fields, the study's speed settings."""
    from locaudit.errors import ConfigError
    from locaudit.evaluate.runner import EvalConfig

    fields = {k: v for k, v in ev.config.items() if k in EvalConfig.model_fields}
    kl = fields.get("kl_text")
    if isinstance(kl, str) and kl.startswith("file:"):  # the trial names the file by content; the spec says where
        if ctx.spec.eval_protocol().get("kl_text") != kl:
            raise ConfigError(f"evaluation.kl_text: the file {ctx.spec.resolved_kl_text()} no longer has the content "
                              "this trial was defined with; run the study again to define new trials")
        fields["kl_text"] = ctx.spec.resolved_kl_text()
    E = ctx.spec.evaluation
    return EvalConfig(format=ctx.spec.data.format, batch_size=E.batch_size, gen_batch_size=E.gen_batch_size,
                      gen_edits_together=E.gen_edits_together,
                      precision=ctx.precision.name, progress=False, **fields)


def _judge(ctx: RunContext, ev: Evaluation, metrics: list[str]):
    return ctx.judge(ev.holdout) if "gen" in metrics and ev.judge else None


def score_split(ctx: RunContext, ev: Evaluation, edit, split: str, n: int | None, metrics: list[str],
                out_dir: Path) -> dict:
    from locaudit.evaluate.runner import evaluate_edit

    result = evaluate_edit(ctx.lm, edit, ctx.eval_view(split, n), split=split, metrics=list(metrics),
                           judge=_judge(ctx, ev, metrics), out_dir=out_dir, config=_config(ctx, ev))
    return flatten_metrics(result)


def score_many(ctx: RunContext, ev: Evaluation, edits: list, split: str, n: int | None, metrics: list[str],
               out_dirs: list[Path], sources: list[Path] | None = None) -> list[dict]:
    """`[score_split(ctx, ev, e, split, n, metrics, o) for e, o in zip(edits, out_dirs)]`, computed together
    (evaluate/shared.evaluate_edits: the unedited layers below each edit's lowest edited layer, the primer and
    the prompts run once for all edits): the same numbers, up to float rounding.

    With `sources` (the folder each edit was loaded from), the edits are scored `evaluation.score_chunk` at a
    time and each edit's scores (its out_dir and metrics) are kept in the run's shared/scores/, under a key of
    its files and of everything that defines its numbers (`scored_key`): a run killed part way through a long
    group keeps the chunks it finished, and the next attempt copies those and scores only the rest."""
    from locaudit.evaluate.shared import evaluate_edits

    view, judge, cfg = ctx.eval_view(split, n), _judge(ctx, ev, metrics), _config(ctx, ev)
    if sources is None:
        results = evaluate_edits(ctx.lm, edits, view, split=split, metrics=list(metrics), judge=judge,
                                 out_dirs=out_dirs, config=cfg)
        return [flatten_metrics(r) for r in results]
    if len(sources) != len(edits) or len(out_dirs) != len(edits):
        raise ValueError(f"score_many: {len(edits)} edits, {len(sources)} sources, {len(out_dirs)} out_dirs")
    kept = [ctx.run.scores / f"score-{scored_key(ctx, ev, s, split, n, metrics)}" for s in sources]
    out: list[dict | None] = [_restore(k, Path(o)) for k, o in zip(kept, out_dirs)]
    todo = [i for i, m in enumerate(out) if m is None]
    if len(todo) < len(edits):
        log.info("%d of %d edit(s) already scored by an earlier attempt (%s); scoring the other %d",
                 len(edits) - len(todo), len(edits), ctx.run.scores, len(todo))
    chunk = ctx.spec.evaluation.score_chunk
    for j in range(0, len(todo), chunk):
        part = todo[j:j + chunk]
        t0 = time.perf_counter()
        results = evaluate_edits(ctx.lm, [edits[i] for i in part], view, split=split, metrics=list(metrics),
                                 judge=judge, out_dirs=[out_dirs[i] for i in part], config=cfg)
        for i, r in zip(part, results):
            out[i] = m = flatten_metrics(r)
            if all(math.isfinite(v) for v in m.values()):  # a non-finite value fails the trial: not kept
                _keep(kept[i], Path(out_dirs[i]), m)
        log.info("scored %d of %d edit(s) (%s) in %.0f s", min(j + chunk, len(todo)), len(todo),
                 ", ".join(metrics), time.perf_counter() - t0)
    return out  # type: ignore[return-value]


SCORED_FILE = "scored.json"


def scored_key(ctx: RunContext, ev: Evaluation, source: Path, split: str, n: int | None, metrics: list[str]) -> str:
    """What an edit's scores depend on: the files of the folder it was loaded from (not its subfolders: a
    trained edit's dose snapshots), the model, the evaluated questions, the metrics, the trial's evaluation
    and the precision."""
    from locaudit.io import CHECKSUM_FILE, file_sha256

    files = {f.name: file_sha256(f, 64) for f in sorted(Path(source).iterdir())
             if f.is_file() and f.name != CHECKSUM_FILE and not f.name.startswith(".")}
    return stable_hash({"edit": files, "model": ctx.spec.model_identity(), "data": ctx.eval_view(split, n).fingerprint,
                        "metrics": sorted(metrics), "evaluation": ev.model_dump(mode="json"),
                        "precision": ctx.precision.name}, 24)


def _keep(kept: Path, out_dir: Path, metrics: dict[str, float]) -> None:
    """Copy a scored edit's out_dir and metrics into `kept`, whole or not at all."""
    from locaudit.io import replace_path, staging_dir

    tmp = staging_dir(kept)
    shutil.copytree(out_dir, tmp, dirs_exist_ok=True)
    write_json_atomic(tmp / SCORED_FILE, {"metrics": metrics})  # last: a folder without it is not used
    replace_path(tmp, kept)


def _restore(kept: Path, out_dir: Path) -> dict[str, float] | None:
    """The metrics kept in `kept` (its files copied into out_dir); None where there are none or they are unreadable."""
    try:
        got = json.loads((kept / SCORED_FILE).read_text(encoding="utf-8"))
        metrics = {str(k): float(v) for k, v in got["metrics"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    shutil.copytree(kept, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(SCORED_FILE))
    return metrics


def evaluate(ctx: RunContext, ev: Evaluation, edit, out_dir: Path) -> dict[str, float]:
    """Score `edit` (None = the unedited model) as evaluation `ev` says, on its split; flat {metric: value}."""
    return score_split(ctx, ev, edit, ev.split, ev.max_questions, list(ev.metrics), out_dir)


def flatten_metrics(result: Any) -> dict[str, float]:
    """Numbers of an EvalResult (or a dict) as {name: float}; adds true_info = true * info when missing."""
    if hasattr(result, "model_dump"):
        raw = result.model_dump()
    elif isinstance(result, dict):
        raw = result
    else:
        raise TypeError(f"cannot read metrics from {type(result).__name__}")
    out: dict[str, float] = {}
    for k, v in raw.items():
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)):
            if not math.isfinite(float(v)) and _undefined_on_empty(str(k), raw):
                continue  # e.g. pref_acc with no pairs in the split: not measured, not failed
            out[str(k)] = float(v)  # any other non-finite value stays, so the trial fails (runner._record)
    if "true_info" not in out and "true" in out and "info" in out:
        out["true_info"] = out["true"] * out["info"]
    return out


_COUNT_OF = {"mc": "n_mc", "kl": "n_kl_tokens", "ce": "n_kl_tokens", "pref": "n_pairs", "true": "n_generated",
             "info": "n_generated"}


def _undefined_on_empty(name: str, raw: dict) -> bool:
    """Whether metric `name` is NaN only because its data was empty (its count field is 0)."""
    for prefix, count in _COUNT_OF.items():
        if name.startswith(prefix):
            return raw.get(count) == 0
    return False
