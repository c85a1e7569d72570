"""Run a Hase study in the resumable ledger (study/ledger.py): one trial for the facts, one for tracing,
one per (problem, method, layer) edit sweep over all facts. A rerun skips finished trials, restarts
interrupted ones, and rebuilds the report from every finished trial.

The trials run on the head study's runner (study/runner.py `run_study` with `hase_plan`): its executors
("local": one trial after another in this process; "ray": each trial whose dependencies are done as a Ray
task with the CPUs / GPUs of spec.resources: the facts trial, then the trace trial, then every edit trial in
parallel), resume, failure handling, progress display and staged trial folders. A trial writes its data/
into a staging sibling of trials/KEY; the driver alone seals it with checksums, writes result.json, puts the
folder in place whole and records the ledger. A worker loads the model once (kept per worker process), so
with Ray RUN must be on storage every node sees.

Files: RUN/ledger.sqlite, RUN/trials/KEY/{result.json, data/...} (data/ sealed with checksums.json),
RUN/report/ (report.py).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from locaudit.errors import ConfigError
from locaudit.io import staging_dir, write_json_atomic
from locaudit.study.hase.spec import HaseSpec
from locaudit.study.ledger import Ledger
from locaudit.study.rundir import trial_rel
from locaudit.study.runner import StudyPlan, run_study
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
    trace = _trial("hase_trace", {**ident, "facts_trial": facts.key, "tracing": spec.tracing.key_dump(),
                                  "layers": layers}, (facts.key,))
    out = [facts, trace]
    for problem in spec.editing.problems:
        for method in spec.editing.methods:
            cfg = edit_key_config(spec.editing.config(method).key_dump(), problem)
            for layer in spread_order(layers):
                out.append(_trial("hase_edit", {**ident, "facts_trial": facts.key, "trace_trial": trace.key,
                                                "problem": problem, "method": method, "layer": layer,
                                                "config": cfg}, (facts.key, trace.key)))
    return out


FORCING_ONLY = ("forcing", "forcing_samples")  # editor settings that only fact forcing reads


def edit_key_config(cfg: dict, problem: str) -> dict:
    """The editor settings an edit trial of `problem` hashes (`cfg`: LayerEditConfig.key_dump(), which leaves newer
    fields out at their defaults, so old studies keep their keys): the fact-forcing-only settings (`forcing`,
    `forcing_samples`) only for fact_forcing, so setting them leaves the keys of every other problem's trials as
    they were."""
    return cfg if problem == "fact_forcing" else {k: v for k, v in cfg.items() if k not in FORCING_ONLY}


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
    """trials/KEY/data: a Hase trial's data files (study/rundir.py's layout)."""
    return Path(run_dir) / trial_rel(key, "data")


def read_data(run_dir: Path, key: str, name: str):
    return json.loads((data_dir(run_dir, key) / name).read_text(encoding="utf-8"))


def n_layers_of(spec: HaseSpec) -> int:
    """The model's depth from its config alone (no weights), for listing trials in a dry run."""
    from locaudit.models.loading import DEFAULT_MODEL, parse_tiny

    if spec.model.name == DEFAULT_MODEL:
        return 30
    tiny = parse_tiny(spec.model.name)  # tiny:FAMILY[:SEED] (default geometry)
    if tiny is not None:
        from locaudit.models.tiny import tiny_config

        cfg = tiny_config(tiny[0])
        return int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer"))
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(spec.model.name, trust_remote_code=spec.model.trust_remote_code)
    return int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer"))


def load_hase_model(spec: HaseSpec):
    """The study's model: a hub id, folder, .gguf, the embedded default, or ``tiny:FAMILY[:SEED]`` (a tiny
    random test model; models/loading.py's grammar)."""
    from locaudit.models.loading import load_model

    m = spec.model
    return load_model(m.name, dtype=m.dtype, device=m.device, trust_remote_code=m.trust_remote_code)


_WORKER_MODEL: dict = {}  # a Ray worker's loaded model, keyed by the spec's model fields (max_calls=0 keeps it)


def _worker_model(spec: HaseSpec):
    key = json.dumps(spec.model.model_dump(), sort_keys=True)
    if key not in _WORKER_MODEL:
        _WORKER_MODEL.clear()  # one model per worker process
        _WORKER_MODEL[key] = load_hase_model(spec)
    return _WORKER_MODEL[key]


class HaseGroup:
    """The group function of Hase trials (executors.GroupFn): run each trial with `lm` (a model loaded by the
    caller; local executor only) or the process's cached model, write its data/ into a staging sibling of
    trials/KEY and yield (key, {"metrics", "artifacts", "staged"}); the driver seals, records and puts the
    folder in place (runner._record). A trial that fails leaves no staging folder behind."""

    def __init__(self, lm=None) -> None:
        self.lm = lm

    def __call__(self, trials: list[HaseTrial], spec: HaseSpec, run_dir: Path):
        from locaudit.study.hase import steps

        run_dir = Path(run_dir)
        lm = self.lm if self.lm is not None else _worker_model(spec)
        precision = spec.resolved()
        for t in trials:
            final = run_dir / trial_rel(t.key)
            tmp = staging_dir(final)
            try:
                metrics = _run_trial(t, spec, lm, run_dir, tmp / "data", precision, steps)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            yield t.key, {"metrics": metrics, "artifacts": {"data": str(data_dir(run_dir, t.key).relative_to(run_dir))},
                          "staged": {str(final.relative_to(run_dir)): str(tmp.relative_to(run_dir))}}


def hase_plan(spec: HaseSpec, n_layers: int, lm=None) -> StudyPlan:
    """The Hase study as the runner's plan: `expand_hase`'s trials, `HaseGroup(lm)`, the spec in the ledger."""

    def prepare(ledger: Ledger) -> None:
        ledger.set_meta(META_KEY, spec.to_json())

    return StudyPlan(expand_hase(spec, n_layers), HaseGroup(lm), prepare, finish=_WORKER_MODEL.clear,
                     label=f"hase {spec.name}")


def run_hase(spec: HaseSpec, run_dir: str | Path, lm=None, max_trials: int | None = None,
             retry_failed: bool = False, progress: bool = True, max_minutes: float | None = None,
             executor: str = "local", ray_address: str | None = None, max_in_flight: int | None = None) -> dict:
    """Run (or resume) the study; returns {"counts": ..., "ran": [trial names], "wall_s": ...}. `lm`: a loaded
    model to use instead of loading spec.model (tests; local executor only). `max_minutes`: start no trial
    after this much time. `executor`: "local" or "ray" (`ray_address`: a cluster to join, "auto" or
    "ray://host:10001"; default: join an initialised Ray or start a local instance; `max_in_flight`: at most
    this many trials at once, default as many as the cluster fits given spec.resources)."""
    if executor == "ray" and lm is not None:
        raise ConfigError("run_hase(lm=...) cannot travel to Ray workers: with executor='ray' each worker loads "
                          "spec.model itself (use a model name, e.g. 'tiny:llama' for a tiny test model)")
    n_layers = lm.sites.n_layers if lm is not None else n_layers_of(spec)
    summary = run_study(spec, run_dir, executor=executor, address=ray_address, retry_failed=retry_failed,
                        max_trials=max_trials, progress=progress, plan=hase_plan(spec, n_layers, lm),
                        max_minutes=max_minutes, max_in_flight=max_in_flight)
    return {"counts": summary.counts, "ran": summary.names, "wall_s": summary.wall_s}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _finite_mean(xs) -> float:
    """The mean of the finite values (NaN, inf and null, a NaN written to JSON, left out); NaN where none is."""
    v = [float(x) for x in xs if _finite(x)]
    return sum(v) / len(v) if v else float("nan")


def max_effect(effects) -> float:
    """A fact's largest finite tracing effect; NaN where none is finite (no corrupted run: symmetric replacement
    without a partner, or a one-token subject at a clean position 0)."""
    v = [float(e) for e in effects if _finite(e)]
    return max(v) if v else float("nan")


def recordable(metrics: dict) -> dict:
    """`metrics` without its NaN values (the ledger records finite numbers only; a left-out metric is one no fact
    gave a value for, and the counts beside it say how many facts had none)."""
    return {k: v for k, v in metrics.items() if _finite(v)}


def trace_metrics(tr: dict, kinds) -> dict:
    """The trace trial's metrics: per tracing kind, the mean over facts of each fact's largest effect (facts with no
    finite effect left out, and counted in n_untraced_KIND; the mean left out where no fact has one), and n_facts."""
    out: dict[str, float] = {"n_facts": float(len(tr["facts"]))}
    for k in kinds:
        m = [max_effect(v["effects"].get(k, [])) for v in tr["facts"].values()]
        out[f"mean_max_effect_{k}"] = _finite_mean(m)
        out[f"n_untraced_{k}"] = float(sum(not _finite(x) for x in m))
    return recordable(out)


def _run_trial(t: HaseTrial, spec: HaseSpec, lm, run_dir: Path, out: Path, precision, steps) -> dict:
    """Run one trial, writing its files into `out` (its staged data/ folder); earlier trials' data/ are read
    from their place in `run_dir`. Returns the trial's metrics. Steps show no progress bars of their own (the
    runner's bar is the run's one display)."""
    out.mkdir(parents=True, exist_ok=True)
    if t.kind == "hase_facts":
        data = steps.prepare_facts(lm, spec, precision, progress=False)
        write_json_atomic(out / "facts.json", data)
        return {k: float(v) for k, v in data["counts"].items()}
    facts_data = read_data(run_dir, t.content["facts_trial"], "facts.json")
    if t.kind == "hase_trace":
        from locaudit.data.facts import Fact

        facts = [Fact.from_dict(d) for d in facts_data["facts"]]
        tr = steps.run_tracing(lm, spec, facts, t.content["layers"], precision, progress=False)
        write_json_atomic(out / "tracing.json", tr)
        return trace_metrics(tr, spec.tracing.kinds)
    tracing = read_data(run_dir, t.content["trace_trial"], "tracing.json")
    rows = steps.edit_at_layer(lm, spec, facts_data, tracing, t.content["problem"], t.content["method"],
                               t.content["layer"], precision, progress=False)
    write_json_atomic(out / "edits.json", rows)
    return recordable({"rewrite_score": _finite_mean([r["rewrite_score"] for r in rows]),
                       "efficacy": _finite_mean([r["efficacy"] for r in rows]), "n_facts": float(len(rows))})
