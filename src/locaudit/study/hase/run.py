"""Run a Hase study in the resumable ledger (study/ledger.py): one trial for the facts, one for tracing,
one per (problem, method, layer) edit sweep over all facts. A rerun skips finished trials, restarts
interrupted ones, and rebuilds the report from every finished trial.

Files: RUN/ledger.sqlite, RUN/trials/KEY/{result.json, data/...} (data/ sealed with checksums.json),
RUN/report/ (report.py).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from locaudit.io import has_checksums, verify_checksums, write_checksums, write_json_atomic
from locaudit.study.hase.spec import HaseSpec
from locaudit.study.ledger import Ledger, write_trial_record
from locaudit.study.trials import Trial, make_trial

log = logging.getLogger(__name__)
META_KEY = "hase_spec"


@dataclass(frozen=True)
class HaseTrial(Trial):
    """A Trial whose name shows its step (facts, trace, edit problem/method/layer)."""

    @property
    def name(self) -> str:
        c = self.content
        if self.kind == "hase_edit":
            return f"edit {c['problem']} {c['method']} layer={c['layer']}"
        return self.kind.replace("hase_", "")

    @property
    def group(self) -> str:
        return "hase"


def _trial(kind: str, content: dict, deps: tuple[str, ...] = ()) -> HaseTrial:
    t = make_trial(kind, content, deps)
    return HaseTrial(t.key, t.kind, t.content, t.deps)


def expand_hase(spec: HaseSpec, n_layers: int) -> list[HaseTrial]:
    """Every trial, dependencies first. Keys hash the model, facts and each step's own settings only."""
    ident = spec.identity()
    facts = _trial("hase_facts", {**ident, "n_kl": spec.editing.lora.n_kl_prompts})
    layers = spec.layer_list(n_layers)
    trace = _trial("hase_trace", {**ident, "facts_trial": facts.key, "tracing": spec.tracing.model_dump(),
                                  "layers": layers}, (facts.key,))
    out = [facts, trace]
    for problem in spec.editing.problems:
        for method in spec.editing.methods:
            cfg = spec.editing.config(method).model_dump()
            for layer in spread_order(layers):
                out.append(_trial("hase_edit", {**ident, "facts_trial": facts.key, "trace_trial": trace.key,
                                                "problem": problem, "method": method, "layer": layer,
                                                "config": cfg}, (facts.key, trace.key)))
    return out


def spread_order(layers: list[int]) -> list[int]:
    """The layers in an order that covers the depth early (first, last, middle, quarters, ...), so that a
    study stopped part-way has edits spread over the model."""
    rest, out = sorted(layers), []
    if not rest:
        return out
    out += [rest[0]] + ([rest[-1]] if len(rest) > 1 else [])
    segs = [(0, len(rest) - 1)]
    while segs:
        nxt = []
        for a, b in segs:
            if b - a > 1:
                m = (a + b) // 2
                out.append(rest[m])
                nxt += [(a, m), (m, b)]
        segs = nxt
    return out


def data_dir(run_dir: Path, key: str) -> Path:
    return Path(run_dir) / "trials" / key / "data"


def read_data(run_dir: Path, key: str, name: str):
    return json.loads((data_dir(run_dir, key) / name).read_text(encoding="utf-8"))


def n_layers_of(spec: HaseSpec) -> int:
    """The model's depth from its config alone (no weights), for listing trials in a dry run."""
    from locaudit.models.loading import DEFAULT_MODEL

    if spec.model.name == DEFAULT_MODEL:
        return 30
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(spec.model.name, trust_remote_code=spec.model.trust_remote_code)
    return int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer"))


def run_hase(spec: HaseSpec, run_dir: str | Path, lm=None, max_trials: int | None = None,
             retry_failed: bool = False, progress: bool = True, max_minutes: float | None = None) -> dict:
    """Run (or resume) the study; returns {"counts": ..., "ran": [...], "wall_s": ...}. `lm`: a loaded model
    to use instead of loading spec.model (tests). `max_minutes`: start no trial after this much time."""
    from locaudit.models.loading import load_model
    from locaudit.study.hase import steps

    run_dir = Path(run_dir)
    t0 = time.time()
    lm_box = {"lm": lm}

    def model():
        if lm_box["lm"] is None:
            lm_box["lm"] = load_model(spec.model.name, dtype=spec.model.dtype, device=spec.model.device,
                                      trust_remote_code=spec.model.trust_remote_code)
        return lm_box["lm"]

    n_layers = lm.sites.n_layers if lm is not None else n_layers_of(spec)
    trials = expand_hase(spec, n_layers)
    ran = []
    precision = spec.precision
    with Ledger(run_dir, writer=True) as ledger:
        ledger.set_meta(META_KEY, spec.to_json())
        ledger.sync(trials)
        ledger.reset_interrupted()
        if retry_failed:
            ledger.retry_failed()
        for row in ledger.rows(status="done"):  # a done trial whose files changed runs again
            d = data_dir(run_dir, row["key"])
            problem = verify_checksums(d) if has_checksums(d) else f"{d} has no checksums"
            if problem:
                ledger.invalidate(row["key"], problem)
        for t in trials:
            status = ledger.status_of([t.key]).get(t.key)
            if status != "pending":
                continue
            if any(ledger.status_of([d]).get(d) != "done" for d in t.deps):
                continue
            if max_trials is not None and len(ran) >= max_trials:
                break
            if max_minutes is not None and time.time() - t0 > 60 * max_minutes:
                break
            ledger.mark_running([t.key])
            started, cpu0 = time.time(), time.process_time()
            try:
                metrics = _run_trial(t, spec, model(), run_dir, precision, progress, steps)
                status, err = "done", None
            except KeyboardInterrupt:
                ledger.release([t.key])
                raise
            except Exception as e:  # recorded as failed, the study goes on
                import traceback

                log.error("trial %s failed: %s", t.name, e)
                metrics, status, err = {}, "failed", traceback.format_exc()
            finished = time.time()
            cpu = time.process_time() - cpu0
            artifacts = {"data": str(data_dir(run_dir, t.key).relative_to(run_dir))} if status == "done" else {}
            if status == "done":
                write_checksums(data_dir(run_dir, t.key))
                write_trial_record(run_dir, t, status, metrics, artifacts, started, finished, "local", cpu)
            ledger.finish(t.key, status, metrics, artifacts, err, started, finished, "local", cpu)
            ran.append(t.name)
        counts = ledger.counts()
    return {"counts": counts, "ran": ran, "wall_s": time.time() - t0}


def _finite_mean(xs) -> float:
    v = [x for x in xs if x is not None and x == x and abs(x) != float("inf")]
    return sum(v) / len(v) if v else 0.0


def _run_trial(t: HaseTrial, spec: HaseSpec, lm, run_dir: Path, precision, progress: bool, steps) -> dict:
    out = data_dir(run_dir, t.key)
    out.mkdir(parents=True, exist_ok=True)
    if t.kind == "hase_facts":
        data = steps.prepare_facts(lm, spec, precision, progress)
        write_json_atomic(out / "facts.json", data)
        return {k: float(v) for k, v in data["counts"].items()}
    facts_data = read_data(run_dir, t.content["facts_trial"], "facts.json")
    if t.kind == "hase_trace":
        from locaudit.data.facts import Fact

        facts = [Fact.from_dict(d) for d in facts_data["facts"]]
        tr = steps.run_tracing(lm, spec, facts, t.content["layers"], precision, progress)
        write_json_atomic(out / "tracing.json", tr)
        kinds = spec.tracing.kinds
        return {f"mean_max_effect_{k}": _finite_mean([max(e for e in v["effects"][k] if e == e)
                                                      for v in tr["facts"].values()]) for k in kinds} | \
            {"n_facts": float(len(facts))}
    tracing = read_data(run_dir, t.content["trace_trial"], "tracing.json")
    rows = steps.edit_at_layer(lm, spec, facts_data, tracing, t.content["problem"], t.content["method"],
                               t.content["layer"], precision, progress)
    write_json_atomic(out / "edits.json", rows)
    return {"rewrite_score": _finite_mean([r["rewrite_score"] for r in rows]),
            "efficacy": _finite_mean([r["efficacy"] for r in rows]), "n_facts": float(len(rows))}
