"""A study expanded into trials, each keyed by a hash of its full content.

Trial kinds, in the order the data flows:
  collect   head activations of the probing examples (shared by probe and ITI)
  probe     per-head probes -> the head ranking (shared by top-K and exclude-top localizers)
  localize  a causal localizer (activation or attribution patching) -> its head ranking (its top-K candidate)
  judge     build (for locaudit's default judge: train once, into the cache) the True/Info judge
  baseline  the unedited model, evaluated
  iti       fit ITI at a localization, one alpha, evaluated
  optimal   train an optimal localized edit (one tau, lr, seed), evaluated
  select    score an ITI or optimal trial's edit on the validation split (nested choice of its grid point)

A trial's key is `stable_hash` of its content: the model and data identity, its own parameters and the
keys of the trials it reads from. It never depends on the rest of the grid, so adding a grid value adds
trials and leaves every other key as it was. The content of each kind is a typed payload (study/payloads.py);
steps read its fields, never string keys of the content.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar

from locaudit.errors import ConfigError
from locaudit.io import stable_hash
from locaudit.study.frames import PRIMARY_ORDER
from locaudit.study.localizers import Localizer
from locaudit.study.payloads import (BaselineTrial, CollectTrial, DataIdentity, Evaluation, ITITrial,
                                     JudgeTrial, LocalizeTrial, ModelIdentity, OptimalTrial, ProbeTrial, SelectTrial,
                                     Selection, TrialPayload, payload_of)
from locaudit.study.rundir import shared_rel, trial_rel
from locaudit.study.spec import StudySpec

KINDS = ("collect", "probe", "localize", "judge", "baseline", "iti", "optimal", "select")
SHARED_KINDS = ("collect", "probe", "localize", "judge")
P = TypeVar("P", bound=TrialPayload)


@dataclass(frozen=True)
class Trial:
    """One unit of work. `content` is what is hashed; the other fields are derived views of it. A study trial's
    content is its typed `payload` (study/payloads.py) dumped; other trial kinds (Hase's) carry a plain dict."""

    key: str
    kind: str
    content: dict = field(compare=False, hash=False)
    deps: tuple[str, ...] = ()
    batch_key: str | None = None  # trials sharing it may be trained in one pass (optimal edits)

    @cached_property
    def payload(self) -> TrialPayload:
        """The typed content (a ConfigError names the fields where the content does not match its kind's model)."""
        return payload_of(self.kind, self.content)

    def as_(self, cls: type[P] | tuple[type[P], ...]) -> P:
        """The payload, checked to be a `cls` (what a step of that kind reads)."""
        p = self.payload
        if not isinstance(p, cls):
            names = " or ".join(c.__name__ for c in (cls if isinstance(cls, tuple) else (cls,)))
            raise ConfigError(f"trial {self.key} is a {self.kind} trial, not {names}")
        return p  # type: ignore[return-value]

    @property
    def localizer(self) -> Localizer | None:
        loc = self.content.get("localizer")
        return Localizer.from_dict(loc) if loc else None

    @property
    def name(self) -> str:
        loc = self.localizer
        grid = ",".join(f"{k}={v}" for k, v in self.grid.items())
        parts = [self.kind] + ([loc.name] if loc else []) + ([grid] if grid else [])
        if self.kind == "optimal" and "seed" in self.content:
            parts.append(f"seed={self.replicate}")
        return " ".join(parts)

    @property
    def group(self) -> str:
        loc = self.localizer
        return loc.group if loc else ("none" if self.kind == "baseline" else "shared")

    @property
    def grid(self) -> dict[str, Any]:
        """The hyper-parameters that vary over the grid (statistics select the best over them). Read from the
        stored content without validating it, so rows of older runs keep their names."""
        return {k: self.content[k] for k in GRID.get(self.kind, ())}

    @property
    def replicate(self) -> int:
        return int(self.content.get("seed", 0)) if self.kind == "optimal" else 0

    def to_dict(self) -> dict:
        return {"key": self.key, "kind": self.kind, "content": self.content, "deps": list(self.deps),
                "batch_key": self.batch_key}

    @classmethod
    def from_dict(cls, d: dict) -> "Trial":
        return cls(d["key"], d["kind"], d["content"], tuple(d.get("deps", ())), d.get("batch_key"))


GRID: dict[str, tuple[str, ...]] = {"iti": ("alpha",), "optimal": ("tau", "lr")}  # each kind's grid fields


def make_trial(kind: str, content: dict, deps: tuple[str, ...] = (), batch_fields: tuple[str, ...] = ()) -> Trial:
    content = {"kind": kind, **content}
    key = stable_hash(content)
    batch_key = stable_hash({k: v for k, v in content.items() if k not in batch_fields}) if batch_fields else None
    return Trial(key, kind, content, deps, batch_key)


def trial_of(payload: TrialPayload, deps: tuple[str, ...] = (), batch_fields: tuple[str, ...] = ()) -> Trial:
    """The trial of a typed payload: its content is `payload.content()`, its key that content's hash."""
    t = make_trial(payload.kind, payload.content(), deps, batch_fields)
    t.__dict__["payload"] = payload  # the cached typed view (a frozen dataclass: set past __setattr__)
    return t


def localize_config(method: str, options: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """A causal localizer's resolved config (every field of its config class, defaults included, as JSON values)
    and its VERSION (the `VERSION` of the module defining its function; None where it has none): what a localize
    trial is keyed on, so a study file that leaves a field unset gets a new key when that field's default or the
    localizer's version changes."""
    import inspect

    from locaudit.localize.registry import causal_localizer

    loc = causal_localizer(method)
    version = getattr(inspect.getmodule(loc.fn), "VERSION", None)
    return loc.make_config(options).model_dump(mode="json"), (int(version) if version is not None else None)


def localizers_of(spec: StudySpec, groups: list[str], n_random: int | None = None) -> list[Localizer]:
    """The localizers of the chosen groups, in a stable order (`n_random`: only the first n random draws)."""
    L = spec.localizers
    top_k = L.probe.top_k
    out: list[Localizer] = []
    if "top" in groups:
        out.append(Localizer("top", k=top_k))
        for method in L.enabled_causal():  # each causal localizer's top-K: a candidate of its own
            out.append(Localizer("top", k=spec.top_k_of(method), ranking=method))
    if "random" in groups:
        ex = top_k if L.random.exclude_top else None
        redraw = {} if ex or L.random.max_overlap is None else {"avoid_top": top_k, "max_overlap": L.random.max_overlap}
        seeds = L.random.draw_seeds()[:n_random] if n_random is not None else L.random.draw_seeds()
        out += [Localizer("random", k=spec.random_k, seed=s, exclude_top=ex, **redraw) for s in seeds]
    if "single" in groups:
        ex = top_k if L.single.exclude_top else None
        out += [Localizer("ranked", index=i) for i in range(L.single.top)]
        out += [Localizer("single", seed=L.single.seed, index=i, exclude_top=ex) for i in range(L.single.n)]
        out += [Localizer("heads", heads=h) for h in L.single.heads]
    if "all" in groups and L.all:
        out.append(Localizer("all"))
    return out


_METRIC_SOURCE = {"true_info": "gen", "true": "gen", "info": "gen", "mc2": "mc", "mc1": "mc", "mc0": "mc",
                  "pref_acc": "pref", "ab": "ab", "kl": "kl", "ce": "ce"}


def selection_metrics(spec: StudySpec) -> list[str]:
    """The evaluate_edit metrics that the verdict's primary metric needs (scored on validation to select)."""
    ev = spec.evaluation
    have = set(ev.metrics)
    primary = spec.verdict.primary_metric
    if primary is None or primary.removeprefix("val_") not in _METRIC_SOURCE:
        sources = [_METRIC_SOURCE[m] for m in PRIMARY_ORDER
                   if _METRIC_SOURCE[m] in have and (_METRIC_SOURCE[m] != "gen" or ev.judge)]
        return sources[:1]
    src = _METRIC_SOURCE[primary.removeprefix("val_")]
    return [src] if src in have else []


def _selection(spec: StudySpec) -> Selection | None:
    """Nested selection on the validation split, when the study asks for it (trials with a grid get a 'select')."""
    ev = spec.evaluation
    metrics = selection_metrics(spec)
    # independent of the grid's size, so adding a grid value leaves every existing key as it was
    if ev.selection != "validation" or not metrics or ev.split == "val":
        return None
    return Selection(split="val", max_questions=ev.val_max_questions or ev.max_questions, metrics=metrics)


def judge_holdout(spec: StudySpec) -> tuple[str, ...]:
    """The splits the study's judge scores and a judge trained by locaudit therefore must not see: the evaluation
    split, and the validation split where selection judges validation answers. The one place it is derived
    (trials, the run's judge, rejudge and the pre-registered judge folder all read it)."""
    ev = spec.evaluation
    select = _selection(spec)
    return tuple(sorted({ev.split, select.split} if select and "gen" in select.metrics else {ev.split}))


def _judge_holdout_field(spec: StudySpec) -> list[str] | None:
    """`judge_holdout` as trial contents hold it: set only where validation answers are judged (keys of studies
    without selection on the judge stay as they were)."""
    select = _selection(spec)
    return list(judge_holdout(spec)) if select and "gen" in select.metrics else None


def _select_trial(t: Trial, select: Selection, judge: tuple[str, ...]) -> Trial:
    """Scoring of trial `t`'s edit on the validation split, to choose its location's grid point.

    A trial of its own (kind 'select'), so adding a grid value adds trials and keeps every other key."""
    p = t.payload
    assert isinstance(p, (ITITrial, OptimalTrial))
    edit_dir = trial_rel(t.key, "edit") if isinstance(p, ITITrial) else shared_rel("optimal", p.training_key())
    return trial_of(SelectTrial(model=p.model, data=p.data, precision=p.precision, of=t.key, of_kind=t.kind,
                                edit_dir=edit_dir, select=select, evaluation=p.evaluation), deps=(t.key,) + judge)


def training_key(t: Trial) -> str:
    """What an optimal edit's training depends on: the trial's content without its evaluation."""
    return t.as_(OptimalTrial).training_key()


def expand(spec: StudySpec) -> list[Trial]:
    """Every trial of the study, dependencies first."""
    common = {"model": ModelIdentity(**spec.model_identity()), "data": DataIdentity(**spec.data_identity()),
              "precision": spec.precision}
    ev = spec.evaluation
    evaluation = Evaluation(metrics=sorted(ev.metrics), judge=spec.judge_identity(), split=ev.split,
                            max_questions=ev.max_questions, judge_holdout=_judge_holdout_field(spec),
                            config=spec.eval_protocol())
    P = spec.localizers.probe
    need_probe = (spec.iti.enabled and bool(spec.iti.localizers)) or any(
        lo.needs_ranking and lo.ranking is None
        for lo in localizers_of(spec, list(spec.optimal.localizers)) if spec.optimal.enabled)

    select = _selection(spec)
    trials: list[Trial] = []
    collect = probe = None
    if spec.iti.enabled or need_probe:
        collect = trial_of(CollectTrial(**common, batch_size=P.collect_batch_size))
        trials.append(collect)
        probe = trial_of(ProbeTrial(**common, collect=collect.key, l2=P.l2), deps=(collect.key,))
        trials.append(probe)
    ranked: dict[str, str] = {}  # causal localizer -> its 'localize' trial key
    for method, c in spec.localizers.enabled_causal().items():
        cfg, version = localize_config(method, {**c.options, "format": spec.data.format,
                                                "top_k": spec.top_k_of(method)})
        lt = trial_of(LocalizeTrial(**common, method=method, split=c.split, config=cfg, version=version))
        trials.append(lt)
        ranked[method] = lt.key

    def ranking_of(loc: Localizer) -> str | None:
        """The 'localize' trial whose ranking a causal localizer's location reads."""
        return ranked.get(loc.ranking) if loc.ranking else None

    judge: tuple[str, ...] = ()
    if evaluation.judged:
        jt = trial_of(JudgeTrial(**common, judge=evaluation.judge, split=ev.split, holdout=evaluation.judge_holdout))
        trials.append(jt)
        judge = (jt.key,)
    if ev.baseline:
        trials.append(trial_of(BaselineTrial(**common, evaluation=evaluation), deps=judge))
    if spec.iti.enabled:
        assert collect is not None and probe is not None
        for loc in localizers_of(spec, list(spec.iti.localizers), spec.localizers.random.iti_n):
            for alpha in spec.iti.alphas:
                rk = ranking_of(loc)
                trials.append(t := trial_of(
                    ITITrial(**common, collect=collect.key, probe=probe.key, localizer=loc, alpha=alpha,
                             direction=spec.iti.direction, evaluation=evaluation, ranking_trial=rk),
                    deps=(collect.key, probe.key) + ((rk,) if rk else ()) + judge))
                if select and len(spec.iti.alphas) > 1:
                    trials.append(_select_trial(t, select, judge))
    if spec.optimal.enabled:
        O = spec.optimal
        for loc in localizers_of(spec, list(O.localizers)):
            gridded = len(O.taus) * len(getattr(O.lr, loc.group)) > 1
            rk = ranking_of(loc)
            probe_dep = probe.key if loc.needs_ranking and probe is not None and not rk else None
            deps = ((probe_dep,) if probe_dep else ()) + ((rk,) if rk else ()) + judge
            for tau in O.taus:
                for lr in getattr(O.lr, loc.group):
                    for seed in O.seeds:
                        trials.append(t := trial_of(
                            OptimalTrial(**common, probe=probe_dep, localizer=loc, tau=tau, lr=lr,
                                         objective=O.objective, rank=O.rank, epochs=O.epochs, batch_size=O.batch_size,
                                         max_train_pairs=O.max_train_pairs, max_val_pairs=O.max_val_pairs,
                                         train_options=dict(sorted(O.train_options.items())), seed=seed,
                                         evaluation=evaluation, ranking_trial=rk,
                                         dose_steps=(list(O.dose_steps) or None) if loc.group in O.dose_localizers
                                         else None),  # keys unchanged when unset
                            deps=deps, batch_fields=("localizer", "probe", "lr")))
                        if select and gridded:
                            trials.append(_select_trial(t, select, judge))
    seen: set[str] = set()
    unique = []
    for t in trials:  # two spellings of one localization (e.g. a listed head twice) are one trial
        if t.key not in seen:
            seen.add(t.key)
            unique.append(t)
    return unique
