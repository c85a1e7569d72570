"""The real work of each trial kind: collect, probe, baseline, ITI and optimal edits, each evaluated.

`run_group(trials, spec, run_dir)` is the group function the executors call. It keeps one
`RunContext` per process (model, data, judge, activations and probes loaded once and reused by every
trial that process runs) and yields each trial's metrics and artifact paths (relative to the run
folder) as soon as the trial is finished.

Files of a run folder:
  shared/collect-KEY/   activations.safetensors, examples.jsonl, meta.json (localize/activations.py)
  shared/probe-KEY/     probe_accuracy.csv, ranking.json, probes.safetensors, probe_heatmap.png
  shared/optimal-TKEY/  a trained optimal edit (edit.safetensors, meta.json, trained.json), keyed by its
                        training content only: changing the evaluation re-evaluates, never retrains
  trials/KEY/edit/      an ITI edit (iti.safetensors, meta.json)
  trials/KEY/eval/      the evaluation (EvalResult files: metrics, generations, judgements)
A trained edit is kept when its evaluation fails, so a retry only evaluates again.
"""

from __future__ import annotations

import json
import logging
import math
import random
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from locaudit.errors import ConfigError, LocauditError
from locaudit.heads import HeadSet
from locaudit.io import has_checksums, stable_hash, verify_checksums, write_checksums, write_json_atomic
from locaudit.study.spec import StudySpec
from locaudit.study.trials import Trial

log = logging.getLogger(__name__)

TRAINED_MARKER = "trained.json"


def load_study_model(spec: StudySpec):
    """The study's model; ``tiny:FAMILY[:SEED]`` builds a tiny random model (tests, smoke runs)."""
    name = spec.resolved_model_name()
    if name.startswith("tiny:"):
        from locaudit.models.tiny import FAMILIES, tiny_model

        parts = name.split(":")
        family = parts[1] if len(parts) > 1 and parts[1] else "llama"
        if family not in FAMILIES or len(parts) > 3:
            raise ConfigError(f"model.name {name!r}: expected tiny:FAMILY[:SEED] with FAMILY in {FAMILIES}")
        seed = int(parts[2]) if len(parts) == 3 else 0
        return tiny_model(family, seed=seed)
    from locaudit.models.loading import load_model, resolve_device

    return load_model(name, dtype=spec.model.dtype, device=str(resolve_device(spec.model.device)),
                      trust_remote_code=spec.model.trust_remote_code)


class RunContext:
    """What the trials of one study share inside one process; everything loads on first use."""

    def __init__(self, spec: StudySpec, run_dir: str | Path) -> None:
        self.spec = spec
        self.run_dir = Path(run_dir)
        self._acts: dict[str, Any] = {}
        self._probes: dict[str, Any] = {}

    @cached_property
    def lm(self):
        return load_study_model(self.spec)

    @cached_property
    def precision(self):
        """The study's precision for this process's device (no model load: probing needs none)."""
        return self.spec.resolved_precision()

    @cached_property
    def data(self):
        from locaudit.data.behaviour import load_behaviour

        d = self.spec.data
        return load_behaviour(self.spec.resolved_data_spec(), seed=d.seed, fractions=d.fractions,
                              mc_path=self.spec.resolved_mc_path(), max_questions=d.max_questions)

    @cached_property
    def eval_data(self) -> "EvalView":
        ev = self.spec.evaluation
        return EvalView(self.data, ev.split, ev.max_questions)

    @cached_property
    def fmt(self):
        from locaudit.data.prompts import PromptFormat

        return PromptFormat(self.spec.data.format, self.spec.data.system)

    @cached_property
    def judge(self):
        if not self.spec.evaluation.judge:
            return None
        from locaudit.evaluate.judges import get_judge
        from locaudit.models.loading import resolve_device

        d = self.spec.data
        data_spec = self.spec.resolved_data_spec()
        refs = data_spec if data_spec.startswith("truthfulqa:") else None
        # a judge trained by locaudit must never have seen the questions it judges: hold out the
        # evaluation split of exactly this data split (same file, seed, fractions, subsample)
        return get_judge(self.spec.resolved_judge(), references=refs, holdout=data_spec,
                         holdout_splits=(self.spec.evaluation.split,), seed=d.seed, fractions=tuple(d.fractions),
                         max_questions=d.max_questions, device=str(resolve_device(self.spec.model.device)))

    def shared_dir(self, kind: str, key: str) -> Path:
        return self.run_dir / "shared" / f"{kind}-{key}"

    def trial_dir(self, key: str) -> Path:
        return self.run_dir / "trials" / key

    def rel(self, p: Path) -> str:
        return str(Path(p).resolve().relative_to(self.run_dir.resolve()))

    def activations(self, collect_key: str):
        if collect_key not in self._acts:
            from locaudit.localize.activations import ActivationSet

            self._acts[collect_key] = ActivationSet.load(self.shared_dir("collect", collect_key))
        return self._acts[collect_key]

    def probe(self, probe_key: str):
        if probe_key not in self._probes:
            from locaudit.localize.probe import ProbeResult

            self._probes[probe_key] = ProbeResult.load(self.shared_dir("probe", probe_key))
        return self._probes[probe_key]

    def heads(self, trial: Trial) -> HeadSet:
        loc = trial.localizer
        assert loc is not None
        probe_key = trial.content.get("probe")
        ranking = self.probe(probe_key).ranking() if loc.needs_ranking else None
        s = self.lm.sites
        return loc.resolve(s.n_layers, s.n_heads, ranking)


_CONTEXTS: dict[tuple[str, str], RunContext] = {}


def context(spec: StudySpec, run_dir: str | Path) -> RunContext:
    """One RunContext per (run folder, spec) per process (Ray workers reuse theirs across trials)."""
    k = (str(Path(run_dir).resolve()), stable_hash(spec.to_json()))
    if k not in _CONTEXTS:
        _CONTEXTS.clear()
        _CONTEXTS[k] = RunContext(spec, run_dir)
    return _CONTEXTS[k]


def clear_contexts() -> None:
    """Drop the cached contexts (model, data, activations) of this process."""
    _CONTEXTS.clear()


def seed_everything(key: str) -> None:
    """Seed from the trial key, so a trial gives the same result whenever and wherever it runs."""
    s = int(key[:8], 16)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


# ---------------------------------------------------------------------------------------------- steps
def run_collect(ctx: RunContext, t: Trial) -> dict:
    from locaudit.localize.activations import collect_probe_activations

    out = ctx.shared_dir("collect", t.key)
    acts = collect_probe_activations(ctx.lm, ctx.data, ctx.fmt, out_dir=out,
                                     batch_size=int(t.content.get("batch_size", 16)), precision=ctx.precision)
    ctx._acts[t.key] = acts
    N, L, H, D = acts.shape
    return {"metrics": {"n_examples": N, "n_layers": L, "n_heads": H, "head_dim": D},
            "artifacts": {"activations": ctx.rel(out)}}


def run_probe(ctx: RunContext, t: Trial) -> dict:
    from locaudit.localize.probe import probe_activations

    res = probe_activations(ctx.activations(t.content["collect"]), l2=float(t.content["l2"]))
    res.meta["top_k"] = ctx.spec.localizers.probe.top_k
    out = ctx.shared_dir("probe", t.key)
    res.save(out)
    ctx._probes[t.key] = res
    acc = res.val_acc.flatten().double()
    k = min(ctx.spec.localizers.probe.top_k, acc.numel())
    return {"metrics": {"best_val_acc": float(acc.max()), "top_k_mean_val_acc": float(acc.sort(descending=True).values[:k].mean()),
                        "median_val_acc": float(acc.median()), "mean_train_acc": float(res.train_acc.double().mean())},
            "artifacts": {"probe": ctx.rel(out)}}


class EvalView:
    """The behaviour data with the evaluation split cut to its first `n` questions (and their MC items and
    pairs), so a study can evaluate on a subsample while training and probing see the full splits."""

    def __init__(self, data: Any, split: str, n: int | None) -> None:
        self._data, self._split = data, split
        qs = data.questions(split)
        self._qids = {q.qid for q in (qs if n is None else qs[:n])}
        self.name = data.name
        self.fingerprint = stable_hash({"data": data.fingerprint, "split": split, "n": n})

    def _check(self, split: str | None) -> None:
        if split != self._split:
            raise ConfigError(f"this evaluation view serves split {self._split!r}, not {split!r}")

    def questions(self, split: str | None = None) -> list:
        self._check(split)
        return [q for q in self._data.questions(split) if q.qid in self._qids]

    def mc_items(self, split: str | None = None) -> list:
        self._check(split)
        return [m for m in self._data.mc_items(split) if m.qid in self._qids]

    def pairs(self, split: str | None = None) -> list:
        self._check(split)
        return [p for p in self._data.pairs(split) if p.qid in self._qids]


def evaluate(ctx: RunContext, edit, out_dir: Path) -> dict[str, float]:
    """Score `edit` (None = the unedited model) with the study's metrics; flat {metric: value}."""
    from locaudit.evaluate.runner import EvalConfig, evaluate_edit

    ev = ctx.spec.evaluation
    cfg = EvalConfig(format=ctx.spec.data.format, batch_size=ev.batch_size, gen_batch_size=ev.gen_batch_size,
                     max_new_tokens=ev.max_new_tokens, precision=ctx.precision.name, mc_primer=ev.mc_primer,
                     progress=False)
    result = evaluate_edit(ctx.lm, edit, ctx.eval_data, split=ev.split, metrics=list(ev.metrics),
                           judge=ctx.judge if "gen" in ev.metrics else None, out_dir=out_dir, config=cfg)
    return flatten_metrics(result)


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


def run_judge(ctx: RunContext, t: Trial) -> dict:
    """Build the judge once (locaudit's default judge is trained here on first use and cached), so
    evaluation trials, in any worker, find it ready."""
    judge = ctx.judge
    return {"metrics": {}, "artifacts": {"judge": str(getattr(judge, "name", t.content["judge"]))}}


def run_baseline(ctx: RunContext, t: Trial) -> dict:
    d = ctx.trial_dir(t.key)
    metrics = evaluate(ctx, None, d / "eval")
    return {"metrics": metrics, "artifacts": {"eval": ctx.rel(d / "eval")}}


def run_iti(ctx: RunContext, t: Trial) -> dict:
    from locaudit.edit.iti import fit_iti

    heads = ctx.heads(t)
    c = t.content
    probe = ctx.probe(c["probe"]) if c["direction"] == "probe" else None
    edit = fit_iti(ctx.activations(c["collect"]), heads, direction=c["direction"], probe=probe, alpha=c["alpha"])
    if not torch.isfinite(edit.theta).all():
        raise ConfigError(f"trial {t.key} ({t.name}): the ITI edit has non-finite values; likely cause: alpha = "
                          f"{c['alpha']} or non-finite activations in {ctx.shared_dir('collect', c['collect'])}")
    d = ctx.trial_dir(t.key)
    edit.save(d / "edit")
    metrics = evaluate(ctx, edit, d / "eval")
    metrics["n_edit_heads"] = float(len(heads))
    return {"metrics": metrics, "artifacts": {"edit": ctx.rel(d / "edit"), "eval": ctx.rel(d / "eval"),
                                              "heads": heads.to_string()}}


def _subsample(items: list, n: int | None, seed: int) -> list:
    if n is None or len(items) <= n:
        return items
    idx = sorted(np.random.default_rng(seed).choice(len(items), size=n, replace=False).tolist())
    return [items[i] for i in idx]


def training_key(t: Trial) -> str:
    """What an optimal edit's training depends on: the trial's content without its evaluation."""
    return stable_hash({k: v for k, v in t.content.items() if k != "evaluation"})


def run_optimal(ctx: RunContext, trials: list[Trial]) -> Iterator[tuple[str, dict]]:
    """Train the group's edits in one pass (equal hyper-parameters but the head set and lr), then
    evaluate each; an edit already trained by an earlier attempt is loaded instead."""
    from locaudit.edit.config import TrainConfig
    from locaudit.edit.lora import LoRAEdit
    from locaudit.edit.multi import train_edits

    c = trials[0].content
    heads = {t.key: ctx.heads(t) for t in trials}
    edit_dir = {t.key: ctx.shared_dir("optimal", training_key(t)) for t in trials}
    todo = [t for t in trials if not _trained_ok(edit_dir[t.key])]
    for t in todo:  # an untrusted folder loses its marker first: only a complete retraining restores it
        (edit_dir[t.key] / TRAINED_MARKER).unlink(missing_ok=True)
    diverged: list[str] = []
    if todo:
        seed = ctx.spec.data.seed
        train_pairs = _subsample(ctx.data.pairs("train"), c["max_train_pairs"], seed)
        val_pairs = _subsample(ctx.data.pairs("val"), c["max_val_pairs"], seed + 1)
        options = dict(c.get("train_options", {}))
        options.setdefault("max_parallel", max(1, len(todo)))  # train_edits groups edits by lowest layer
        cfg = TrainConfig.make(objective=c["objective"], tau=c["tau"], rank=c["rank"], epochs=c["epochs"],
                               batch_size=c["batch_size"], seed=c["seed"], progress=True,
                               precision=ctx.precision.name, **options)
        results = train_edits(ctx.lm, [heads[t.key] for t in todo], train_pairs, val_pairs, ctx.fmt, cfg,
                              lrs=[float(t.content["lr"]) for t in todo])
        for t, (edit, tlog) in zip(todo, results):
            d = edit_dir[t.key]
            if getattr(tlog, "diverged", None):  # never saved: the trial fails with the reason (below)
                diverged.append(f"trial {t.key} ({t.name}): {tlog.diverged}")
                continue
            edit.save(d)
            write_json_atomic(d / TRAINED_MARKER, {"seconds": tlog.seconds, "before": tlog.before, "after": tlog.after,
                                                   "n_train": tlog.n_train, "n_val": tlog.n_val})
            write_checksums(d)  # last: the folder is trusted only while it matches
    bad = {t.key for t in todo if not (edit_dir[t.key] / TRAINED_MARKER).exists()}
    for t in trials:
        if t.key in bad:
            continue
        d = ctx.trial_dir(t.key)
        edit = LoRAEdit.load(edit_dir[t.key])
        metrics = evaluate(ctx, edit, d / "eval")
        trained = json.loads((edit_dir[t.key] / TRAINED_MARKER).read_text())
        metrics["n_edit_heads"] = float(len(heads[t.key]))
        metrics["train_seconds"] = float(trained.get("seconds", float("nan")))
        for k, v in (trained.get("after") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "epoch":
                metrics[f"train_{k}"] = float(v)
        yield t.key, {"metrics": metrics, "artifacts": {"edit": ctx.rel(edit_dir[t.key]), "eval": ctx.rel(d / "eval"),
                                                       "heads": heads[t.key].to_string()}}
    if diverged:
        from locaudit.edit.train import TrainingError

        raise TrainingError("; ".join(diverged))


def _trained_ok(d: Path) -> bool:
    """Whether a trained-edit folder can be trusted: its marker is there and its files match their
    checksums (a folder from before checksums is trusted if it loads and is finite, then sealed)."""
    if not (d / TRAINED_MARKER).exists():
        return False
    if has_checksums(d):
        problem = verify_checksums(d)
        if problem:
            log.warning("retraining the edit in %s: %s", d, problem)
        return problem is None
    from locaudit.edit.lora import LoRAEdit

    try:
        edit = LoRAEdit.load(d)
        json.loads((d / TRAINED_MARKER).read_text(encoding="utf-8"))
    except (LocauditError, OSError, ValueError) as e:
        log.warning("retraining the edit in %s: %s", d, e)
        return False
    if not (torch.isfinite(edit.a).all() and torch.isfinite(edit.b).all()):
        log.warning("retraining the edit in %s: non-finite parameters", d)
        return False
    write_checksums(d)
    return True


STEPS = {"collect": run_collect, "probe": run_probe, "judge": run_judge, "baseline": run_baseline, "iti": run_iti}


def run_group(trials: list[Trial], spec: StudySpec, run_dir: Path) -> Iterator[tuple[str, dict]]:
    """The executors' group function for the real steps (see the module docstring)."""
    ctx = context(spec, run_dir)
    kinds = {t.kind for t in trials}
    if len(kinds) != 1:
        raise ConfigError(f"a trial group mixes kinds {sorted(kinds)}")
    kind = kinds.pop()
    if kind == "optimal":
        seed_everything(trials[0].key)
        for key, res in run_optimal(ctx, trials):
            yield key, _with_precision(ctx, res)
        return
    if kind not in STEPS:
        raise ConfigError(f"unknown trial kind {kind!r}")
    for t in trials:
        seed_everything(t.key)
        yield t.key, _with_precision(ctx, STEPS[kind](ctx, t))


def _with_precision(ctx: RunContext, result: dict) -> dict:
    """Record, in the trial's ledger row, the precision it actually ran at and the worker's CPU capability
    (a study may resume on another machine, where `auto` resolves differently)."""
    meta = ctx.precision.meta()
    return {**result, "artifacts": {**result.get("artifacts", {}), "precision": meta["precision"],
                                    "cpu_capability": meta["cpu_capability"]}}
