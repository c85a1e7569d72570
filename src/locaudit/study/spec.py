"""A study file (YAML) as a validated `StudySpec`.

A study names a model, a behaviour dataset, the localizations to compare (the probe's top-K heads,
random K-head draws, single heads, all heads), the edits to make there (ITI over an alpha grid, optimal
edits over tau / learning-rate grids) and how to evaluate them. `load_study(path)` validates it on
load: unknown fields are rejected and every error names the field path and the value at fault.

Strings in ``data.spec`` and ``data.mc_path`` may use ``${VAR}`` or ``${VAR:-default}``; relative
paths there resolve against the YAML file's folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from locaudit.errors import ConfigError
from locaudit.io import file_sha256, stable_hash

Group = Literal["top", "random", "single", "all"]
GROUPS: tuple[str, ...] = ("top", "random", "single", "all")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_PATH_KINDS = ("truthfulqa", "pairs", "caa")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    name: str = Field("smollm2-135m-instruct", description="Hub id, local folder, .gguf file, the default "
                      "'smollm2-135m-instruct', or 'tiny:FAMILY[:SEED]' (a tiny random model for tests); "
                      "${VAR:-default} expands (trial keys use the name as written).")
    dtype: Literal["fp32", "float32", "bf16", "bfloat16", "fp16", "float16"] = Field(
        "fp32", description="Weights dtype.")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto (cuda when available). Not part of "
                        "trial keys: a run may move between machines.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the checkpoint (off by default).")


class DataSpec(_Strict):
    spec: str = Field(..., description="Behaviour spec: 'truthfulqa:PATH.csv' | 'truthfulqa' | "
                      "'caa:NAME_OR_PATH' | 'pairs:PATH'; ${VAR:-default} expands; relative paths "
                      "resolve against the study file's folder.")
    mc_path: str | None = Field(None, description="Optional TruthfulQA mc_task.json for MC1/MC2.")
    max_questions: int | None = Field(None, ge=2, description="Subsample this many questions (seeded).")
    seed: int = Field(0, description="Seed of the split by question and of subsampling.")
    fractions: tuple[float, float, float] = Field((0.6, 0.2, 0.2), description="train/val/test fractions.")
    format: Literal["plain", "chat"] = Field("plain", description="Prompt format (data/prompts.py).")
    system: str | None = Field(None, description="Chat format only: a system message.")

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"fractions must be non-negative and sum to 1, got {list(v)}")
        return v


class ProbeSpec(_Strict):
    top_k: int = Field(16, ge=1, description="The candidate localization: the K heads of best validation accuracy.")
    l2: float = Field(1.0, gt=0, description="L2 penalty of the per-head logistic-regression probes (1/C; "
                      "1.0 = scikit-learn's default, as ITI uses).")
    collect_batch_size: int = Field(16, ge=1, description="Batch size when collecting head activations.")
    autocast: Literal["none", "bf16"] = Field("none", description="Autocast while collecting activations "
                                              "(bf16: several times faster on CPUs with AMX; stored as fp32).")


class RandomSpec(_Strict):
    n: int = Field(16, ge=0, description="Number of random K-head draws (seeds seed_start..seed_start+n-1).")
    k: int | None = Field(None, ge=1, description="Heads per draw; default: probe.top_k.")
    seed_start: int = Field(0, ge=0, description="First draw seed.")
    seeds: list[int] | None = Field(None, description="Explicit draw seeds (replaces n / seed_start).")
    exclude_top: bool = Field(False, description="Never draw one of the probe's top-K heads.")

    def draw_seeds(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else list(range(self.seed_start, self.seed_start + self.n))


class SingleSpec(_Strict):
    n: int = Field(0, ge=0, description="Number of distinct single heads sampled (a seeded permutation of all heads).")
    seed: int = Field(0, ge=0, description="Seed of that permutation; raising n keeps the earlier heads.")
    heads: list[str] = Field(default_factory=list, description="Listed single heads, e.g. ['L12H3', '20.1'].")
    exclude_top: bool = Field(False, description="Never sample one of the probe's top-K heads.")

    @field_validator("heads")
    @classmethod
    def _heads(cls, v: list[str]) -> list[str]:
        from locaudit.heads import HeadSet

        for s in v:
            hs = HeadSet.parse(s)
            if len(hs) != 1:
                raise ValueError(f"single head {s!r} names {len(hs)} heads; give one head per entry")
        return v


class LocalizerSpec(_Strict):
    probe: ProbeSpec = Field(default_factory=ProbeSpec, description="Probing: the candidate top-K heads.")
    random: RandomSpec = Field(default_factory=RandomSpec, description="Random K-head draws (the control).")
    single: SingleSpec = Field(default_factory=SingleSpec, description="Single heads (sampled and/or listed).")
    all: bool = Field(True, description="Include every head of every layer (full alignment).")


class ITISpec(_Strict):
    enabled: bool = Field(True, description="Run ITI (heuristic) edits.")
    alphas: list[float] = Field(default_factory=lambda: [5.0, 15.0], min_length=1, description="Alpha grid.")
    direction: Literal["mass_mean", "probe"] = Field("mass_mean", description="ITI direction.")
    localizers: list[Group] = Field(default_factory=lambda: ["top", "random"], description="Where to edit.")


class LRGrid(_Strict):
    top: list[float] = Field(default_factory=lambda: [5e-4], min_length=1, description="Learning rates, top-K heads.")
    random: list[float] = Field(default_factory=lambda: [5e-4], min_length=1, description="Learning rates, random draws.")
    single: list[float] = Field(default_factory=lambda: [2e-3], min_length=1, description="Learning rates, single heads.")
    all: list[float] = Field(default_factory=lambda: [1e-4], min_length=1, description="Learning rates, all heads.")

    @model_validator(mode="after")
    def _positive(self) -> "LRGrid":
        for g in GROUPS:
            for lr in getattr(self, g):
                if not lr > 0:
                    raise ValueError(f"{g}: learning rate must be > 0, got {lr}")
        return self


class OptimalSpec(_Strict):
    enabled: bool = Field(True, description="Run optimal (trained, localized LoRA) edits.")
    taus: list[float] = Field(default_factory=lambda: [0.1], min_length=1, description="IPO tau grid.")
    lr: LRGrid = Field(default_factory=LRGrid, description="Learning-rate grid per localizer group (paper: "
                       "1e-4 all heads, 5e-4 16 heads, 2e-3 one head).")
    objective: Literal["ipo", "dpo", "sft"] = Field("ipo", description="Training objective.")
    rank: int = Field(1, ge=1, description="LoRA rank (1 in the paper).")
    epochs: int = Field(2, ge=1, description="Epochs over the training pairs.")
    batch_size: int = Field(4, ge=1, description="Pairs per optimiser step.")
    max_train_pairs: int | None = Field(None, ge=1, description="Subsample the training pairs (seeded by data.seed).")
    max_val_pairs: int | None = Field(256, ge=1, description="Subsample the validation pairs (training curve only).")
    train_options: dict[str, Any] = Field(default_factory=dict, description="Further TrainConfig fields "
                                          "(edit/config.py), e.g. {autocast: false, warmup_ratio: 0.1}.")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="Training seeds (replicates).")
    localizers: list[Group] = Field(default_factory=lambda: list(GROUPS), description="Where to edit.")
    batch_edits: int = Field(1, ge=1, description="Train up to this many edits with equal hyper-parameters in "
                             "one pass (speed only; not part of trial keys).")

    @field_validator("taus")
    @classmethod
    def _taus(cls, v: list[float]) -> list[float]:
        if any(not t > 0 for t in v):
            raise ValueError(f"taus must be > 0, got {v}")
        return v

    @field_validator("train_options")
    @classmethod
    def _train_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        owned = {"objective", "tau", "lr", "rank", "epochs", "batch_size", "seed", "progress"}
        clash = sorted(owned & set(v))
        if clash:
            raise ValueError(f"{clash} are set by the study's own fields (taus, lr, rank, ...), not train_options")
        from locaudit.edit.config import TrainConfig

        unknown = sorted(set(v) - set(TrainConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {sorted(TrainConfig.model_fields)}")
        try:
            TrainConfig(**v)
        except ValidationError as e:
            raise ValueError("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None
        return v


class EvalSpec(_Strict):
    metrics: list[str] = Field(default_factory=lambda: ["mc", "kl", "ce", "gen"], min_length=1,
                               description="evaluate_edit metrics: mc, kl, ce, pref, gen (gen + judge = True/Info).")
    judge: str | None = Field(None, description="Judge spec for True/Info of generations (evaluate/judges); "
                              "${VAR:-default} expands.")
    split: Literal["train", "val", "test"] = Field("test", description="Questions to evaluate on.")
    max_questions: int | None = Field(None, ge=1, description="Evaluate on the first N questions of the split.")
    max_new_tokens: int = Field(50, ge=1, description="Greedy generation length.")
    autocast: Literal["none", "bf16", "fp16"] = Field("none", description="Autocast of evaluation matmuls.")
    mc_primer: bool = Field(False, description="TruthfulQA's six-shot QA primer before each MC prompt.")
    batch_size: int = Field(32, ge=1, description="Scoring batch size (speed only).")
    gen_batch_size: int = Field(16, ge=1, description="Generation batch size (speed only).")
    baseline: bool = Field(True, description="Also evaluate the unedited model.")

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str]) -> list[str]:
        from locaudit.evaluate.runner import METRICS

        bad = [m for m in v if m not in METRICS]
        if bad:
            raise ValueError(f"unknown metric(s) {bad}; choose from {list(METRICS)}")
        return list(dict.fromkeys(v))

class ResourceSpec(_Strict):
    cpus: float = Field(1.0, gt=0, description="CPUs per trial (Ray executor).")
    gpus: float = Field(0.0, ge=0, description="GPUs per trial (Ray executor).")


class StudySpec(_Strict):
    name: str = Field(..., min_length=1, description="Study name (default run folder: runs/NAME).")
    description: str = Field("", description="Free text shown in the report.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="The model to study.")
    data: DataSpec = Field(..., description="The behaviour dataset and its split.")
    localizers: LocalizerSpec = Field(default_factory=LocalizerSpec, description="Localizations to compare.")
    iti: ITISpec = Field(default_factory=ITISpec, description="Heuristic ITI edits.")
    optimal: OptimalSpec = Field(default_factory=OptimalSpec, description="Optimal localized edits.")
    evaluation: EvalSpec = Field(default_factory=EvalSpec, description="How edits are scored.")
    resources: ResourceSpec = Field(default_factory=ResourceSpec, description="What one trial asks of a worker.")
    base_dir: str = Field("", description="Folder that relative paths resolve against (set by load_study).")

    @model_validator(mode="after")
    def _consistent(self) -> "StudySpec":
        seeds = self.localizers.random.seeds
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ValueError(f"localizers.random.seeds has duplicates: {seeds}")
        return self

    # ------------------------------------------------------------------ derived values
    @property
    def random_k(self) -> int:
        return self.localizers.random.k or self.localizers.probe.top_k

    def resolved_data_spec(self) -> str:
        """data.spec with ${VAR} expanded and a relative path made absolute (against base_dir)."""
        return resolve_data_spec(self.data.spec, Path(self.base_dir or "."), "data.spec")

    def resolved_mc_path(self) -> str | None:
        if self.data.mc_path is None:
            return None
        return str(_resolve_path(expand_env(self.data.mc_path, "data.mc_path"), Path(self.base_dir or ".")))

    def data_identity(self) -> dict:
        """What the data contributes to trial keys: the content of the files, not where they lie."""
        spec = self.resolved_data_spec()
        kind, _, rest = spec.partition(":")
        ident: dict[str, Any] = {"kind": kind, "source": _content_id(rest) if rest else kind}
        mc = self.resolved_mc_path()
        if mc is not None:
            ident["mc"] = _content_id(mc)
        ident.update(max_questions=self.data.max_questions, seed=self.data.seed, fractions=list(self.data.fractions),
                     format=self.data.format, system=self.data.system)
        return ident

    def resolved_model_name(self) -> str:
        """model.name with ${VAR} expanded (trial keys use the name as written)."""
        return expand_env(self.model.name, "model.name")

    def resolved_judge(self) -> str | None:
        """evaluation.judge with ${VAR} expanded; a relative trained:DIR resolves against base_dir."""
        j = self.evaluation.judge
        if not j:
            return None
        j = expand_env(j, "evaluation.judge")
        kind, sep, rest = j.partition(":")
        if kind == "trained" and rest and not Path(rest).expanduser().is_absolute():
            return f"trained:{_resolve_path(rest, Path(self.base_dir or '.'))}"
        return j

    def judge_identity(self) -> str | None:
        """What the judge contributes to trial keys: its spec with ${VAR} expanded, paths as written."""
        j = self.evaluation.judge
        return expand_env(j, "evaluation.judge") if j else None

    def model_identity(self) -> dict:
        return {"name": self.model.name, "dtype": _canonical_dtype(self.model.dtype)}

    def to_json(self) -> dict:
        return self.model_dump(mode="json")


def _canonical_dtype(d: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(d, d)


def expand_env(text: str, field: str) -> str:
    """Expand ${VAR} and ${VAR:-default}; an unset variable without a default is an error naming `field`."""

    def sub(m: re.Match) -> str:
        var, default = m.group(1), m.group(2)
        val = os.environ.get(var)
        if val is None or val == "":
            if default is None:
                raise ConfigError(f"{field}: environment variable ${{{var}}} is not set (in {text!r}); "
                                  f"set it or write ${{{var}:-default}}")
            return default
        return val

    return _ENV.sub(sub, text)


def _resolve_path(p: str, base: Path) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _looks_like_path(s: str) -> bool:
    return "/" in s or os.sep in s or Path(s).suffix.lower() in (".csv", ".json", ".jsonl", ".tsv")


def resolve_data_spec(spec: str, base: Path, field: str = "data.spec") -> str:
    """Expand env vars in a behaviour spec and make its path absolute; check that a named file exists."""
    s = expand_env(spec, field)
    kind, sep, rest = s.partition(":")
    if not sep or kind not in _PATH_KINDS or not rest or not _looks_like_path(rest):
        return s
    path = _resolve_path(rest, base)
    if not path.exists():
        raise ConfigError(f"{field}: {spec!r} names {path}, which does not exist "
                          f"(relative paths resolve against {base}; set LOCAUDIT_DATA if the data lies elsewhere)")
    return f"{kind}:{path}"


def _content_id(p: str) -> str:
    """A file's sha256, a folder's hash of its files' hashes, or the string itself (hub names)."""
    path = Path(p)
    if path.is_file():
        return "sha256:" + file_sha256(path)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file())
        return "dir:" + stable_hash([[str(f.relative_to(path)), file_sha256(f)] for f in files])
    return p


def _format_validation_error(e: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid study ({e.error_count()} error{'s' if e.error_count() > 1 else ''})"]
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (not part of the study schema; check its spelling)"
        val = err.get("input")
        shown = repr(val)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"  {loc}: {msg} (value: {shown})")
    return "\n".join(lines)


def parse_study(obj: Any, base_dir: str | Path = ".", source: str = "<study>") -> StudySpec:
    """Validate a study dict; errors name the field path and the value."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{source}: a study must be a YAML mapping, got {type(obj).__name__}")
    if "base_dir" in obj:
        raise ConfigError(f"{source}: base_dir: set by locaudit, not by the study file")
    try:
        spec = StudySpec.model_validate({**obj, "base_dir": str(Path(base_dir).resolve())})
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None
    spec.resolved_data_spec()  # fail early on a missing data file or variable, naming the field
    spec.resolved_mc_path()
    spec.resolved_model_name()
    spec.resolved_judge()
    return spec


def load_study(path: str | Path) -> StudySpec:
    """Read and validate a study YAML file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"study file {path} does not exist")
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_study(obj, path.parent, str(path))
