"""What each kind of study trial is: one frozen model per trial kind, whose `content()` is the hashed content.

`trials.expand` builds these from the `StudySpec`; a trial's key is `stable_hash(payload.content())`, so the
content is exactly the dict trial keys have always hashed (tests/unit/test_trial_keys.py pins keys of fixed
contents). Steps read typed fields (`p.alpha`, `p.evaluation.split`, `p.train_config(...)`) instead of string
keys. A field listed in `OMIT_IF_NONE` is left out of the content when it is None: it was added after trials
without it were defined, and leaving it out keeps their keys.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, model_serializer,
                      model_validator)

from locaudit.errors import ConfigError
from locaudit.io import stable_hash
from locaudit.study.localizers import Localizer


def _localizer(v: Any) -> Localizer:
    if isinstance(v, Localizer):
        return v
    if not isinstance(v, dict):
        raise ValueError(f"a localizer is a mapping of its fields, got {type(v).__name__}")
    try:
        return Localizer.from_dict(v)
    except TypeError as e:
        raise ValueError(f"not a localizer: {e}") from None


# a Localizer in a payload; in the content it is Localizer.to_dict() (unset fields left out)
LocalizerField = Annotated[Localizer, PlainValidator(_localizer), PlainSerializer(lambda loc: loc.to_dict())]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _dump(self, handler) -> dict:
        return {k: v for k, v in handler(self).items() if not (v is None and k in self.OMIT_IF_NONE)}


class ModelIdentity(_Frozen):
    """What the model contributes to trial keys (StudySpec.model_identity)."""

    name: str
    dtype: str


class DataIdentity(_Frozen):
    """What the data contributes to trial keys (StudySpec.data_identity): the content of its files (`source`, `mc`:
    a file's sha256, a folder's hash, or a hub name), the subsample, the split and the prompt format."""

    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"mc"})
    kind: str
    source: str
    mc: str | None = None
    max_questions: int | None
    seed: int
    fractions: list[float]
    format: str
    system: str | None


class Evaluation(_Frozen):
    """How a trial's edit is scored: the metrics, the judge (its spec as the study wrote it), the split, its
    subsample, the splits a locaudit-trained judge must not have seen (`judge_holdout`, set only where
    validation answers are judged) and every result-defining EvalConfig field (`config`; flat in the
    content, beside the others: EvalConfig has a field named `protocol`, for one)."""

    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"judge_holdout"})
    NAMED: ClassVar[tuple[str, ...]] = ("metrics", "judge", "split", "max_questions", "judge_holdout")

    metrics: list[str]
    judge: str | None
    split: str
    max_questions: int | None
    judge_holdout: list[str] | None = None
    config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _split_config(cls, v: Any) -> Any:
        """The flat content -> the named fields and `config` (the EvalConfig fields)."""
        if isinstance(v, dict) and not isinstance(v.get("config"), dict):
            return {**{k: x for k, x in v.items() if k in cls.NAMED},
                    "config": {k: x for k, x in v.items() if k not in cls.NAMED}}
        return v

    @model_serializer(mode="wrap")
    def _dump(self, handler) -> dict:
        d = handler(self)
        config = d.pop("config", {}) or {}
        return {**{k: v for k, v in d.items() if not (v is None and k in self.OMIT_IF_NONE)}, **config}

    @property
    def holdout(self) -> tuple[str, ...]:
        """The splits a locaudit-trained judge of this evaluation never saw."""
        return tuple(self.judge_holdout or (self.split,))

    @property
    def judged(self) -> bool:
        return bool(self.judge) and "gen" in self.metrics


class Selection(_Frozen):
    """Scoring on the validation split, to choose a location's grid point."""

    split: str
    max_questions: int | None
    metrics: list[str]


class TrialPayload(_Frozen):
    """The content every study trial shares: the model and data identity and the precision as written."""

    kind: str
    model: ModelIdentity
    data: DataIdentity
    precision: str

    def content(self) -> dict:
        """The hashed content (JSON values)."""
        return self.model_dump(mode="json")

    def key(self) -> str:
        return stable_hash(self.content())


class CollectTrial(TrialPayload):
    kind: Literal["collect"] = "collect"
    batch_size: int


class ProbeTrial(TrialPayload):
    kind: Literal["probe"] = "probe"
    collect: str
    l2: float


class LocalizeTrial(TrialPayload):
    """A causal localizer's head ranking; `config` is the localizer's whole resolved config (every field, defaults
    included) and `version` its VERSION, so a changed default or version gives a new key."""

    kind: Literal["localize"] = "localize"
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"version"})
    method: str
    split: str
    config: dict[str, Any]
    version: int | None = None  # the localizer's VERSION (its module's); unset in trials of older runs

    @property
    def top_k(self) -> int:
        return int(self.config["top_k"])


class JudgeTrial(TrialPayload):
    kind: Literal["judge"] = "judge"
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"holdout"})
    judge: str | None
    split: str
    holdout: list[str] | None = None

    @property
    def holdout_splits(self) -> tuple[str, ...]:
        return tuple(self.holdout or (self.split,))


class BaselineTrial(TrialPayload):
    kind: Literal["baseline"] = "baseline"
    evaluation: Evaluation


class ITITrial(TrialPayload):
    kind: Literal["iti"] = "iti"
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"ranking_trial"})
    collect: str
    probe: str
    localizer: LocalizerField
    alpha: float
    direction: str
    evaluation: Evaluation
    ranking_trial: str | None = None  # the 'localize' trial whose ranking a causal localizer's location reads


class OptimalTrial(TrialPayload):
    """An optimal edit: its location, its training (the TrainConfig fields a study sets) and its evaluation."""

    kind: Literal["optimal"] = "optimal"
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"ranking_trial", "dose_steps"})
    probe: str | None
    localizer: LocalizerField
    tau: float
    lr: float
    objective: str
    rank: int
    epochs: int
    batch_size: int
    max_train_pairs: int | None
    max_val_pairs: int | None
    train_options: dict[str, Any]
    seed: int
    evaluation: Evaluation
    ranking_trial: str | None = None
    dose_steps: list[float] | None = None

    def training_key(self) -> str:
        """What the trained edit depends on: the content without its evaluation (a new evaluation never retrains)."""
        return stable_hash({k: v for k, v in self.content().items() if k != "evaluation"})

    def train_config(self, precision: str, max_parallel: int = 1):
        """The TrainConfig of this edit (learning rates are per edit: `lr`); `progress` off (the study's bar)."""
        from locaudit.edit.config import TrainConfig

        options = dict(self.train_options)
        options.setdefault("max_parallel", max(1, max_parallel))  # train_edits groups edits by lowest layer
        if self.dose_steps:
            options["snapshot_steps"] = list(self.dose_steps)
        return TrainConfig.make(objective=self.objective, tau=self.tau, rank=self.rank, epochs=self.epochs,
                                batch_size=self.batch_size, seed=self.seed, progress=False, precision=precision,
                                **options)


class SelectTrial(TrialPayload):
    """Trial `of`'s edit (in `edit_dir`, relative to the run folder) scored on the validation split."""

    kind: Literal["select"] = "select"
    of: str
    of_kind: str
    edit_dir: str
    select: Selection
    evaluation: Evaluation


PAYLOADS: dict[str, type[TrialPayload]] = {p.model_fields["kind"].default: p for p in (
    CollectTrial, ProbeTrial, LocalizeTrial, JudgeTrial, BaselineTrial, ITITrial, OptimalTrial, SelectTrial)}


def payload_of(kind: str, content: dict) -> TrialPayload:
    """The typed payload of a trial's content; a ConfigError names the kind and the fields at fault."""
    from pydantic import ValidationError

    cls = PAYLOADS.get(kind)
    if cls is None:
        raise ConfigError(f"trial kind {kind!r} has no payload model; known: {sorted(PAYLOADS)}")
    try:
        return cls.model_validate(content)
    except ValidationError as e:
        shown = "; ".join(f"{'.'.join(map(str, x['loc'])) or '<root>'}: {x['msg']}" for x in e.errors()[:6])
        raise ConfigError(f"{kind} trial content does not match {cls.__name__}: {shown}") from None
