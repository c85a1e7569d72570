"""What the trials of one study share inside one process: model, data, judges, activations, probes.

`context(spec, run_dir)` keeps one `RunContext` per process (Ray workers reuse theirs across trials);
everything in it loads on first use. Steps read what defines a result from the trial's content; the
context only supplies the loaded objects and execution settings (devices, batch sizes).
"""

from __future__ import annotations

import random
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from locaudit.errors import ConfigError
from locaudit.heads import HeadSet
from locaudit.io import stable_hash
from locaudit.study.payloads import ITITrial, OptimalTrial
from locaudit.study.rundir import RunDir
from locaudit.study.spec import StudySpec
from locaudit.study.trials import Trial


def load_study_model(spec: StudySpec):
    """The study's model; ``tiny:FAMILY[:SEED]`` builds a tiny random model (tests, smoke runs)."""
    from locaudit.models.loading import load_model, parse_tiny, resolve_device

    name = spec.resolved_model_name()
    try:
        if parse_tiny(name) is not None:  # the one parser of tiny:FAMILY[:SEED] (a tiny model in fp32, CPU)
            return load_model(name)
    except ConfigError as e:
        raise ConfigError(f"model.name: {e}") from None

    return load_model(name, dtype=spec.model.dtype, device=str(resolve_device(spec.model.device)),
                      trust_remote_code=spec.model.trust_remote_code)


class EvalView:
    """The behaviour data with one split cut to its first `n` questions (and their MC items and pairs),
    so a study can evaluate on a subsample while training and probing see the full splits."""

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

    def __getattr__(self, name: str):  # anything else a metric may read (e.g. behaviour metadata)
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._data, name)


class RunContext:
    """What the trials of one study share inside one process; everything loads on first use. `run` is the run
    folder's layout (study/rundir.py), `results` the shared results other trials read (activations, probes,
    causal rankings)."""

    def __init__(self, spec: StudySpec, run_dir: str | Path) -> None:
        self.spec = spec
        self.run = RunDir(Path(run_dir))
        self.run_dir = self.run.root
        self.results = SharedResults(self.run)
        self._views: dict[tuple, EvalView] = {}
        self._judges: dict[tuple, Any] = {}
        self._staged: dict[str, tuple[Path, Path]] = {}  # trial key -> (trials/KEY, its staging folder)

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

    def eval_view(self, split: str, n: int | None) -> EvalView:
        k = (split, n)
        if k not in self._views:
            self._views[k] = EvalView(self.data, split, n)
        return self._views[k]

    @cached_property
    def fmt(self):
        from locaudit.data.prompts import PromptFormat

        return PromptFormat(self.spec.data.format, self.spec.data.system)

    def judge(self, holdout_splits: tuple[str, ...]):
        """The study's judge (study/judge.py); a judge trained by locaudit never sees the questions of
        `holdout_splits` (the splits it will judge) of exactly this data split."""
        judge_spec = self.spec.resolved_judge()
        if not judge_spec:
            return None
        k = tuple(sorted(holdout_splits))
        if k not in self._judges:
            from locaudit.study.judge import build_judge

            self._judges[k] = build_judge(self.spec, judge_spec, k)
        return self._judges[k]

    def trial_dir(self, key: str) -> Path:
        """Where a trial writes its folder: a new temporary sibling of trials/KEY (`io.staging_dir`), the same one
        for every call during the trial. The driver renames it into place whole once the trial is recorded as
        done (`runner._record`), so trials/KEY is never half written; `rel` names paths in it by their final
        place, which artifacts record."""
        from locaudit.io import staging_dir

        final = self.run.trial(key)
        if key not in self._staged or not self._staged[key][1].is_dir():
            self._staged[key] = (final, staging_dir(final))
        return self._staged[key][1]

    def take_staged(self, key: str) -> dict[str, str]:
        """{final: staging folder} (relative to the run folder) of trial `key`, for its result; forgets it."""
        got = self._staged.pop(key, None)
        return {} if got is None else {self.rel(got[0]): self.rel(got[1])}

    def drop_staged(self, key: str) -> None:
        """Remove the staging folder of trial `key` (its step failed); trials/KEY is left as it was."""
        import shutil

        got = self._staged.pop(key, None)
        if got is not None:
            shutil.rmtree(got[1], ignore_errors=True)

    def rel(self, p: Path) -> str:
        """`p` relative to the run folder; a path in a staged trial folder by its final place."""
        p = Path(p).resolve()
        for final, tmp in self._staged.values():
            try:
                p = final.resolve() / p.relative_to(tmp.resolve())
                break
            except ValueError:
                continue
        return str(p.relative_to(self.run_dir.resolve()))

    def ranking(self, trial: Trial) -> list | dict | None:
        """The head ranking a trial's localizer reads, best first: the probe's as a list, a causal localizer's
        as {localizer name: ranking} (the form `Localizer.resolve` reads a named ranking from)."""
        p = trial.as_((ITITrial, OptimalTrial))  # type: ignore[arg-type]
        loc = p.localizer
        if not loc.needs_ranking:
            return None
        if loc.ranking:
            if p.ranking_trial is None:
                raise ConfigError(f"trial {trial.key} ({trial.name}) reads the {loc.ranking} ranking but names no "
                                  "'localize' trial")
            return {loc.ranking: self.results.ranking(p.ranking_trial)}
        if p.probe is None:
            raise ConfigError(f"trial {trial.key} ({trial.name}) needs a head ranking but names no localizer trial")
        return self.results.probe(p.probe).ranking()

    def heads(self, trial: Trial) -> HeadSet:
        p = trial.as_((ITITrial, OptimalTrial))  # type: ignore[arg-type]
        s = self.lm.sites
        return p.localizer.resolve(s.n_layers, s.n_heads, self.ranking(trial))


class SharedResults:
    """The results of shared trials (collect, probe, localize) that other trials read: loaded from the run folder
    on first use and kept; a step that has just computed one hands it over (`keep_*`) instead of reloading it."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self._acts: dict[str, Any] = {}
        self._probes: dict[str, Any] = {}
        self._rankings: dict[str, Any] = {}

    def activations(self, collect_key: str):
        """The ActivationSet of 'collect' trial `collect_key`."""
        if collect_key not in self._acts:
            from locaudit.localize.activations import ActivationSet

            self._acts[collect_key] = ActivationSet.load(self.run.collect(collect_key))
        return self._acts[collect_key]

    def probe(self, probe_key: str):
        """The ProbeResult of 'probe' trial `probe_key`."""
        if probe_key not in self._probes:
            from locaudit.localize.probe import ProbeResult

            self._probes[probe_key] = ProbeResult.load(self.run.probe(probe_key))
        return self._probes[probe_key]

    def ranking(self, localize_key: str) -> list:
        """The head ranking (best first) of 'localize' trial `localize_key`."""
        if localize_key not in self._rankings:
            from locaudit.localize.effects import HeadEffects

            self._rankings[localize_key] = HeadEffects.load(self.run.localize(localize_key)).ranking()
        return self._rankings[localize_key]

    def keep_activations(self, collect_key: str, acts) -> None:
        self._acts[collect_key] = acts

    def keep_probe(self, probe_key: str, res) -> None:
        self._probes[probe_key] = res

    def keep_ranking(self, localize_key: str, ranking: list) -> None:
        self._rankings[localize_key] = ranking


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
