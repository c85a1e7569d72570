"""Where trials run: in this process, one after another (`LocalExecutor`, the default), or on a Ray
cluster, one group of trials per worker task with the CPUs / GPUs it asks for (`RayExecutor`).

Workers never touch the ledger: a group function returns each trial's metrics and artifact paths, and
the driver records them, one transaction per trial. So any number of workers share one ledger without
write conflicts, and a crashed worker can only lose its own trials (recorded as failed).

A group function has the signature ``fn(trials, spec, run_dir) -> Iterator[(key, result)]``: it gets
one trial, or several that may share work (optimal edits with equal hyper-parameters), and yields each
trial's ``{"metrics": {...}, "artifacts": {...}, "staged": {...}}`` as soon as it is finished (`staged`:
the trial folder it wrote into a staging sibling, which the driver puts in place; see `Outcome.staged`).
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from locaudit.study.spec import StudySpec
from locaudit.study.trials import Trial


class Spec(Protocol):
    """What the executors need of a study's spec (the head study's StudySpec, the Hase study's HaseSpec): what
    one trial asks of a worker, and the JSON a worker rebuilds the spec from (``type(spec).model_validate``)."""

    resources: Any

    def to_json(self) -> dict: ...


GroupFn = Callable[[list[Trial], Any, Path], Iterator[tuple[str, dict]]]


@dataclass
class Outcome:
    """How one trial ended, as a worker reports it."""

    status: str  # done | failed
    metrics: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)
    error: str | None = None
    started: float = 0.0
    finished: float = 0.0
    worker: str = ""
    cpu_s: float | None = None  # CPU time of the worker process (all threads) during the trial
    # {final trial folder: its staging folder}, paths relative to the run folder: where the step wrote the
    # trial's folder; the driver puts it in place whole once it records the trial as done (runner._record)
    staged: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_group_safely(fn: GroupFn, trials: list[Trial], spec: Spec, run_dir: Path) -> Iterator[tuple[str, Outcome]]:
    """Run `fn` on a group; every trial gets exactly one Outcome, failed ones carry the traceback."""
    pending = {t.key for t in trials}
    started, cpu0 = time.time(), time.process_time()
    try:
        for key, result in fn(trials, spec, run_dir):
            if key not in pending:
                raise RuntimeError(f"group function returned trial {key}, which is not pending in its group")
            pending.discard(key)
            now, cpu = time.time(), time.process_time()
            yield key, Outcome("done", dict(result.get("metrics", {})), dict(result.get("artifacts", {})),
                               None, started, now, worker_id(), cpu - cpu0, dict(result.get("staged") or {}))
            started, cpu0 = now, cpu
    except Exception:
        err = traceback.format_exc()
        now = time.time()
        for key in [t.key for t in trials if t.key in pending]:
            pending.discard(key)
            yield key, Outcome("failed", error=err, started=started, finished=now, worker=worker_id())
    now = time.time()
    for key in [t.key for t in trials if t.key in pending]:
        yield key, Outcome("failed", error="the group function ended without a result for this trial",
                           started=started, finished=now, worker=worker_id())


class LocalExecutor:
    """Sequential, in this process: submit one group, then `collect` runs it."""

    name = "local"

    def __init__(self, fn: GroupFn, spec: Spec, run_dir: Path) -> None:
        self.fn, self.spec, self.run_dir = fn, spec, Path(run_dir)
        self._queue: list[list[Trial]] = []

    @property
    def capacity(self) -> int:
        return 1

    def in_flight(self) -> int:
        return len(self._queue)

    def submit(self, group: list[Trial]) -> None:
        self._queue.append(group)

    def collect(self) -> Iterator[tuple[Trial, Outcome]]:
        """Run the oldest submitted group, yielding each trial's outcome as it ends."""
        group = self._queue[0]
        by_key = {t.key: t for t in group}
        try:
            for key, outcome in run_group_safely(self.fn, group, self.spec, self.run_dir):
                yield by_key[key], outcome
        finally:
            self._queue.pop(0)

    def cancel(self) -> list[Trial]:
        out = [t for g in self._queue for t in g]
        self._queue.clear()
        return out

    def shutdown(self) -> None:
        pass


def _ray_group(fn: GroupFn, trial_dicts: list[dict], spec_json: dict, run_dir: str, cpus: float,
               spec_cls: type = StudySpec, trial_cls: type = Trial) -> list[tuple[str, dict]]:
    """A Ray task: rebuild the trials and spec (of the driver's classes: head studies' StudySpec / Trial,
    or another study's, e.g. the Hase study's), run the group, return every outcome."""
    import torch

    torch.set_num_threads(max(1, int(cpus)))
    spec = spec_cls.model_validate(spec_json)
    trials = [trial_cls.from_dict(d) for d in trial_dicts]
    return [(k, o.to_dict()) for k, o in run_group_safely(fn, trials, spec, Path(run_dir))]


class RayExecutor:
    """One Ray task per group with `cpus` / `gpus` each; at most as many in flight as the cluster fits.

    `spec` is any pydantic spec with ``resources`` (cpus, gpus) and ``to_json()``; workers rebuild it and
    the trials with the classes the driver passes (StudySpec / Trial for head studies).

    `address=None` starts a local Ray instance (``num_cpus`` of this machine, no dashboard); otherwise
    it joins a running cluster (``auto`` or ``ray://host:10001``). The run folder must be on storage
    that every node sees (artifacts are written there by the workers).
    """

    name = "ray"

    def __init__(self, fn: GroupFn, spec: Spec, run_dir: Path, address: str | None = None,
                 cpus: float | None = None, gpus: float | None = None, num_cpus: int | None = None,
                 max_in_flight: int | None = None) -> None:
        import ray

        self.ray = ray
        self.fn, self.spec, self.run_dir = fn, spec, Path(run_dir).resolve()
        self.cpus = float(cpus if cpus is not None else spec.resources.cpus)
        self.gpus = float(gpus if gpus is not None else spec.resources.gpus)
        self._started_ray = False
        if not ray.is_initialized():
            kwargs: dict = dict(include_dashboard=False, log_to_driver=True, configure_logging=False)
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **kwargs)
            self._started_ray = True
        self._remote = ray.remote(max_calls=0)(_ray_group)  # max_calls is only settable here, not in .options()
        self._refs: dict = {}
        res = ray.cluster_resources()
        fit_cpu = int(res.get("CPU", 1) // self.cpus) if self.cpus > 0 else 10**6
        fit_gpu = int(res.get("GPU", 0) // self.gpus) if self.gpus > 0 else 10**6
        fits = max(1, min(fit_cpu, fit_gpu))
        if self.gpus > 0 and res.get("GPU", 0) < self.gpus:
            from locaudit.errors import ConfigError

            raise ConfigError(f"resources.gpus={self.gpus} per trial, but the Ray cluster has {res.get('GPU', 0)} GPUs")
        self._capacity = min(fits, max_in_flight) if max_in_flight else fits

    @property
    def capacity(self) -> int:
        return self._capacity

    def in_flight(self) -> int:
        return len(self._refs)

    def submit(self, group: list[Trial]) -> None:
        # max_calls=0: a worker (GPU ones too, whose Ray default is 1) keeps its process, hence its loaded
        # model and activations, for the next trial
        ref = self._remote.options(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0).remote(
            self.fn, [t.to_dict() for t in group], self.spec.to_json(), str(self.run_dir), self.cpus,
            type(self.spec), type(group[0]))
        self._refs[ref] = group

    def collect(self) -> Iterator[tuple[Trial, Outcome]]:
        """Wait for the next finished task; yield its trials' outcomes (a lost worker fails its trials)."""
        ready, _ = self.ray.wait(list(self._refs), num_returns=1)
        for ref in ready:
            group = self._refs.pop(ref)
            by_key = {t.key: t for t in group}
            try:
                results = self.ray.get(ref)
            except Exception as e:  # the worker died or the task could not run
                now = time.time()
                err = f"Ray task failed: {type(e).__name__}: {e}"
                for t in group:
                    yield t, Outcome("failed", error=err, started=now, finished=now, worker="ray")
                continue
            for key, o in results:
                yield by_key[key], Outcome(**o)

    def cancel(self) -> list[Trial]:
        out = []
        for ref, group in list(self._refs.items()):
            self.ray.cancel(ref, force=True)
            out.extend(group)
        self._refs.clear()
        return out

    def shutdown(self) -> None:
        if self._started_ray:
            self.ray.shutdown()
