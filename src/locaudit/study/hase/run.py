"""Run a Hase study in the resumable ledger (study/ledger.py): one trial for the facts, one for tracing,
one per (problem, method, layer) edit sweep over all facts. A rerun skips finished trials, restarts
interrupted ones, and rebuilds the report from every finished trial.

Files: RUN/ledger.sqlite, RUN/trials/KEY/{result.json, data/...} (data/ sealed with checksums.json),
RUN/report/ (report.py).

Executors: "local" runs the trials one after another in this process; "ray" runs each trial whose
dependencies are done as a Ray task (study/executors.py RayExecutor, `resources` CPUs / GPUs per trial):
the facts trial, then the trace trial, then every edit trial in parallel. A worker loads the model once
(kept per worker process) and writes the trial's data/ folder, so RUN must be on storage every node sees;
the driver alone writes the ledger, the checksums and result.json, as on the local path.
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
    trace = _trial("hase_trace", {**ident, "facts_trial": facts.key, "tracing": spec.tracing.key_dump(),
                                  "layers": layers}, (facts.key,))
    out = [facts, trace]
    for problem in spec.editing.problems:
        for method in spec.editing.methods:
            cfg = spec.editing.config(method).key_dump()  # old studies keep their trial keys
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
    random test model; locaudit.api.load_model's grammar)."""
    from locaudit.api import load_model

    m = spec.model
    return load_model(m.name, dtype=m.dtype, device=m.device, trust_remote_code=m.trust_remote_code)


_WORKER_MODEL: dict = {}  # a Ray worker's loaded model, keyed by the spec's model fields (max_calls=0 keeps it)


def _worker_model(spec: HaseSpec):
    key = json.dumps(spec.model.model_dump(), sort_keys=True)
    if key not in _WORKER_MODEL:
        _WORKER_MODEL.clear()  # one model per worker process
        _WORKER_MODEL[key] = load_hase_model(spec)
    return _WORKER_MODEL[key]


def hase_group(trials: list[HaseTrial], spec: HaseSpec, run_dir: Path):
    """The Ray executor's group function (executors.GroupFn): run each trial with the worker's cached model,
    write its data/ folder, yield (key, {"metrics", "artifacts"}); the driver records them."""
    from locaudit.study.hase import steps

    lm, run_dir = _worker_model(spec), Path(run_dir)
    for t in trials:
        metrics = _run_trial(t, spec, lm, run_dir, spec.resolved(), False, steps)
        yield t.key, {"metrics": metrics, "artifacts": {"data": str(data_dir(run_dir, t.key).relative_to(run_dir))}}


def _record(ledger: Ledger, run_dir: Path, t: HaseTrial, status: str, metrics: dict, err: str | None,
            started: float, finished: float, worker: str, cpu: float | None) -> None:
    """The driver's record of a finished trial: checksums of data/ and result.json when done, then the ledger."""
    artifacts = {"data": str(data_dir(run_dir, t.key).relative_to(run_dir))} if status == "done" else {}
    if status == "done":
        write_checksums(data_dir(run_dir, t.key))
        write_trial_record(run_dir, t, status, metrics, artifacts, started, finished, worker, cpu)
    ledger.finish(t.key, status, metrics, artifacts, err, started, finished, worker, cpu)


def run_hase(spec: HaseSpec, run_dir: str | Path, lm=None, max_trials: int | None = None,
             retry_failed: bool = False, progress: bool = True, max_minutes: float | None = None,
             executor: str = "local", ray_address: str | None = None, max_in_flight: int | None = None) -> dict:
    """Run (or resume) the study; returns {"counts": ..., "ran": [...], "wall_s": ...}. `lm`: a loaded model
    to use instead of loading spec.model (tests; local executor only). `max_minutes`: start no trial after
    this much time. `executor`: "local" or "ray" (`ray_address`: a cluster to join, "auto" or
    "ray://host:10001"; default: join an initialised Ray or start a local instance; `max_in_flight`: at most
    this many trials at once, default as many as the cluster fits given spec.resources)."""
    from locaudit.errors import ConfigError

    if executor not in ("local", "ray"):
        raise ConfigError(f"executor {executor!r}: expected 'local' or 'ray'")
    if executor == "ray" and lm is not None:
        raise ConfigError("run_hase(lm=...) cannot travel to Ray workers: with executor='ray' each worker loads "
                          "spec.model itself (use a model name, e.g. 'tiny:llama' for a tiny test model)")
    run_dir = Path(run_dir)
    t0 = time.time()
    n_layers = lm.sites.n_layers if lm is not None else n_layers_of(spec)
    trials = expand_hase(spec, n_layers)
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
        if executor == "ray":
            ran = _run_ray(spec, run_dir, trials, ledger, t0, max_trials, max_minutes, ray_address,
                           max_in_flight, progress)
        else:
            ran = _run_local(spec, run_dir, trials, ledger, t0, lm, max_trials, max_minutes, progress)
        counts = ledger.counts()
    return {"counts": counts, "ran": ran, "wall_s": time.time() - t0}


def _run_local(spec: HaseSpec, run_dir: Path, trials: list[HaseTrial], ledger: Ledger, t0: float, lm,
               max_trials: int | None, max_minutes: float | None, progress: bool) -> list[str]:
    from locaudit.study.hase import steps

    lm_box = {"lm": lm}

    def model():
        if lm_box["lm"] is None:
            lm_box["lm"] = load_hase_model(spec)
        return lm_box["lm"]

    ran = []
    precision = spec.resolved()
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
        _record(ledger, run_dir, t, status, metrics, err, started, finished, "local", time.process_time() - cpu0)
        ran.append(t.name)
    return ran


def _run_ray(spec: HaseSpec, run_dir: Path, trials: list[HaseTrial], ledger: Ledger, t0: float,
             max_trials: int | None, max_minutes: float | None, address: str | None,
             max_in_flight: int | None, progress: bool) -> list[str]:
    """Submit every pending trial whose dependencies are done, as many at once as the executor fits;
    record each outcome as it comes back. A failed or lost task fails its trial; Ctrl-C releases the
    trials in flight."""
    from tqdm.auto import tqdm

    from locaudit.study.executors import RayExecutor

    status = ledger.status_of()
    todo = [t for t in trials if status.get(t.key) == "pending"]
    if not todo:
        return []
    ran: list[str] = []
    inflight: set[str] = set()
    ex = RayExecutor(hase_group, spec, run_dir, address=address, max_in_flight=max_in_flight)
    bar = tqdm(total=len(todo), desc=f"hase {spec.name} (ray)", unit="trial", disable=not progress)
    try:
        while True:
            stop = ((max_trials is not None and len(ran) + len(inflight) >= max_trials)
                    or (max_minutes is not None and time.time() - t0 > 60 * max_minutes))
            while not stop and ex.in_flight() < ex.capacity:
                t = next((u for u in todo if all(status.get(d) == "done" for d in u.deps)), None)
                if t is None:
                    break
                ledger.mark_running([t.key], worker=ex.name)
                status[t.key] = "running"
                inflight.add(t.key)
                todo.remove(t)
                ex.submit([t])
                stop = max_trials is not None and len(ran) + len(inflight) >= max_trials
            if not ex.in_flight():
                break  # what is left waits on failed dependencies or on the limits
            for t, o in ex.collect():
                st, err, metrics = o.status, o.error, o.metrics
                if st == "done" and not data_dir(run_dir, t.key).is_dir():
                    st, metrics = "failed", {}
                    err = (f"the worker wrote {data_dir(run_dir, t.key)}, which this driver does not see: the "
                           f"run folder must be on storage shared by every Ray node")
                if st == "failed":
                    first = (err or "").strip().splitlines()[-1:] or ["?"]
                    log.error("trial %s failed: %s", t.name, first[0])
                _record(ledger, run_dir, t, st, metrics, err, o.started or time.time(), o.finished or time.time(),
                        o.worker or "ray", o.cpu_s)
                inflight.discard(t.key)
                status[t.key] = st
                ran.append(t.name)
                bar.update(1)
                bar.set_postfix_str(f"{t.name[:40]} {st}")
    except BaseException:
        ex.cancel()
        ledger.release(sorted(inflight))
        raise
    finally:
        bar.close()
        ex.shutdown()
    return ran


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
