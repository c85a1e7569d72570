"""A study file (YAML) as a validated `StudySpec`.

A study names a model, a behaviour dataset, the localizations to compare (the probe's top-K heads,
random K-head draws, single heads, all heads), the edits to make there (ITI over an alpha grid, optimal
edits over tau / learning-rate grids) and how to evaluate them. `load_study(path)` validates it on
load: unknown fields are rejected and every error names the field path and the value at fault.

Strings in ``data.spec`` and ``data.mc_path`` may use ``${VAR}`` or ``${VAR:-default}``; relative
paths there resolve against the YAML file's folder.

The `localizers` section's models are in study/localizer_spec.py, the `iti` and `optimal` sections' in
study/edit_spec.py, and what they all share in study/spec_base.py; every name is importable from here too.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from locaudit.errors import ConfigError
from locaudit.evaluate.runner import EvalConfig
from locaudit.fields import from_config
from locaudit.models.precision import PrecisionName
from locaudit.io import file_sha256, stable_hash
from locaudit.study.edit_spec import ITISpec, LRGrid, OptimalSpec  # noqa: F401  (re-exported)
from locaudit.study.localizer_spec import CausalSpec, LocalizerSpec, ProbeSpec, RandomSpec, SingleSpec  # noqa: F401
from locaudit.study.spec_base import GROUPS, Group, Seed, _Strict, bounded_repr, check_config_fields  # noqa: F401

log = logging.getLogger(__name__)
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_PATH_KINDS = ("truthfulqa", "pairs", "caa")


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
    seed: Seed = Field(0, description="Seed of the split by question and of subsampling.")
    fractions: tuple[float, float, float] = Field((0.6, 0.2, 0.2), description="train/val/test fractions.")
    format: Literal["plain", "chat"] = Field("plain", description="Prompt format (data/prompts.py).")
    system: str | None = Field(None, description="Chat format only: a system message.")

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"fractions must be non-negative and sum to 1, got {list(v)}")
        return v


# EvalConfig fields a study sets elsewhere (format: data.format; precision: the study's) or that only
# change speed: every other EvalConfig field defines results, so it is part of the evaluation trials' keys
EVAL_NOT_IN_KEYS = ("format", "precision", "batch_size", "gen_batch_size", "gen_edits_together", "progress")
# EvalConfig fields added after studies had run: in a trial's key only when set, so that leaving them at their
# default ("as before") keeps every existing key (tests/unit/test_trial_keys.py)
EVAL_KEYED_IF_SET = ("gen_max_questions",)


SPEED_ONLY = "Speed only: not part of trial keys."


class EvalSpec(_Strict):
    """How edits are scored. Further keys are EvalConfig fields (evaluate/runner.py): protocol, kl_text,
    kl_max_tokens, judge_threshold, max_length, ... (the same validated config as the Python API)."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    metrics: list[str] = Field(default_factory=lambda: ["mc", "kl", "ce", "gen"], min_length=1,
                               description="evaluate_edit metrics: mc, kl, ce, pref, gen (gen + judge = True/Info).")
    judge: str | None = Field(None, description="Judge spec for True/Info of generations (evaluate/judges); "
                              "${VAR:-default} expands.")
    split: Literal["train", "val", "test"] = Field("test", description="Questions to evaluate on.")
    max_questions: int | None = Field(None, ge=1, description="Evaluate on the first N questions of the split.")
    # EvalConfig's own fields, set by name (their type, default, range and description are EvalConfig's)
    max_new_tokens: from_config(EvalConfig, "max_new_tokens")
    mc_primer: from_config(EvalConfig, "mc_primer")
    batch_size: from_config(EvalConfig, "batch_size", SPEED_ONLY)
    gen_batch_size: from_config(EvalConfig, "gen_batch_size", SPEED_ONLY)
    gen_edits_together: from_config(EvalConfig, "gen_edits_together", SPEED_ONLY)
    score_chunk: int = Field(16, ge=1, description="Trained edits (and dose snapshots) of a group scored in one "
                             "shared pass; each chunk's scores are kept as it ends, so a run killed while scoring "
                             "a long group goes on from the last finished chunk. Larger chunks share more work "
                             "(the layers below the edits, the primer) but lose more to a kill. " + SPEED_ONLY)
    baseline: bool = Field(True, description="Also evaluate the unedited model.")
    selection: Literal["validation", "cross-fit"] = Field(
        "validation", description="How each location's grid point (alpha; tau x lr) is chosen when it has more "
        "than one: 'validation' also scores those trials on the validation split (the metrics the primary metric "
        "needs; the judge then holds out validation questions too) and reports the chosen point on the test split; "
        "'cross-fit' costs nothing extra: it chooses on one half of the test questions and reports on the other, "
        "both ways. Either way, the report's 'best on test' view is labelled optimistic.")
    val_max_questions: int | None = Field(None, ge=1, description="Validation questions used for selection "
                                          "(default: max_questions).")

    @model_validator(mode="after")
    def _config_fields(self) -> "EvalSpec":
        check_config_fields(EvalConfig, dict(self.model_extra or {}), {"format", "precision", "progress"},
                            "the study (data.format, precision)", "evaluation field",
                            known=set(type(self).model_fields) | set(EvalConfig.model_fields) - set(EVAL_NOT_IN_KEYS))
        return self

    def config_fields(self) -> dict[str, Any]:
        """The EvalConfig fields this study sets: its own fields that EvalConfig has too, and the extra keys."""
        shared = {n: getattr(self, n) for n in type(self).model_fields if n in EvalConfig.model_fields}
        return {**shared, **(self.model_extra or {})}

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str]) -> list[str]:
        from locaudit.evaluate.runner import METRICS

        bad = [m for m in v if m not in METRICS]
        if bad:
            raise ValueError(f"unknown metric(s) {bad}; choose from {list(METRICS)}")
        return list(dict.fromkeys(v))

class VerdictSpec(_Strict):
    """How the report decides (docs/verdict.md); not part of trial keys: changing it only re-reports."""

    alpha: float = Field(0.05, gt=0, lt=0.5, description="Level of every test (family-wise with holm, FDR with bh).")
    margin: float = Field(0.10, gt=0, lt=1, description="Equivalence margin as a fraction of full alignment's "
                          "gain over the unedited model: 'as effective' means within +-margin of that gain, and "
                          "a single head matches full alignment when its gain fraction's lower bound is > 1 - margin.")
    multiplicity: Literal["holm", "bh", "none"] = Field("holm", description="Correction across the headline "
                                                        "table (and within the single-head and secondary families): "
                                                        "holm (family-wise error), bh (false discovery rate) or none.")
    level: float = Field(0.95, gt=0.5, lt=1, description="Confidence level of the reported intervals.")
    primary_metric: str | None = Field(None, description="The metric the verdict rests on and grid points are "
                                       "chosen by; default: the first of true_info, true, mc2, mc1, mc0, pref_acc, info.")
    power: float = Field(0.8, gt=0.5, lt=1, description="Target power of the design checks.")
    assumed_gain: float = Field(0.3, gt=0, description="Design checks before any result: full alignment's gain "
                                "over the unedited model on the primary metric (metric units).")
    assumed_location_sd: float = Field(0.25, gt=0, description="Design checks before any result: sd of the "
                                       "primary metric over random locations, as a fraction of that gain.")
    assumed_question_sd: float = Field(0.2, gt=0, description="Design checks before any result: sd over test "
                                       "questions of the per-question difference between two edits.")
    kl_budget: float | None = Field(None, gt=0, description="Matched collateral damage (optimal.dose_steps): the "
                                    "KL on generic text at which locations' gains are compared; None: kl_budget_fraction "
                                    "of the KL that full alignment's edit reaches (else the random draws' median).")
    kl_budget_fraction: float = Field(0.5, gt=0, le=1, description="The KL budget as a fraction of full "
                                      "alignment's KL, where kl_budget is not set.")


class ResourceSpec(_Strict):
    cpus: float = Field(1.0, gt=0, description="CPUs per trial (Ray executor).")
    gpus: float = Field(0.0, ge=0, description="GPUs per trial (Ray executor).")


class StudySpec(_Strict):
    name: str = Field(..., min_length=1, description="Study name (default run folder: runs/NAME).")
    description: str = Field("", description="Free text shown in the report.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="The model to study.")
    precision: PrecisionName = Field("auto", description="Compute precision of every step: auto (bf16 on GPUs "
                                     "with bf16, and on CPUs with AMX or AVX512-BF16 where the check at first "
                                     "use measures bf16 faster; fp32 elsewhere; models/precision.py), "
                                     "fp32, bf16 or fp16. Part of trial keys as written; the resolved precision "
                                     "is recorded per trial.")
    data: DataSpec = Field(..., description="The behaviour dataset and its split.")
    localizers: LocalizerSpec = Field(default_factory=LocalizerSpec, description="Localizations to compare.")
    iti: ITISpec = Field(default_factory=ITISpec, description="Heuristic ITI edits.")
    optimal: OptimalSpec = Field(default_factory=OptimalSpec, description="Optimal localized edits.")
    evaluation: EvalSpec = Field(default_factory=EvalSpec, description="How edits are scored.")
    resources: ResourceSpec = Field(default_factory=ResourceSpec, description="What one trial asks of a worker.")
    verdict: VerdictSpec = Field(default_factory=VerdictSpec, description="Statistics of the verdict: level, "
                                 "equivalence margin, multiplicity correction, design-check assumptions.")
    base_dir: str = Field("", description="Folder that relative paths resolve against (set by load_study).")

    @model_validator(mode="after")
    def _consistent(self) -> "StudySpec":
        seeds = self.localizers.random.seeds
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ValueError(f"localizers.random.seeds has duplicates: {seeds}")
        uses = [f"{part}.localizers" for part, on, locs in (("iti", self.iti.enabled, self.iti.localizers),
                                                           ("optimal", self.optimal.enabled, self.optimal.localizers))
                if on and "random" in locs]
        judge = self.evaluation.judge
        if judge and "gen" in self.evaluation.metrics:  # a judge must be valid for the behaviour it scores
            from locaudit.evaluate.judges.behaviours import check_judge

            try:
                judge, data = expand_env(judge, "evaluation.judge"), expand_env(self.data.spec, "data.spec")
            except ConfigError:
                judge = None  # an unset variable is reported where it is expanded
            if judge:
                check_judge(judge, data)
        if uses and not self.localizers.random.draw_seeds():
            raise ValueError(f"localizers.random draws no heads (n: 0) but 'random' is listed in {' and '.join(uses)}: "
                             "a study needs random draws for its comparison; set random.n >= 1 or remove 'random' there")
        return self

    def default_run_dir(self) -> Path:
        """runs/<name>, the name made one safe folder name (a name never points elsewhere, e.g. '/etc'). Where
        that loses information (other characters, non-ASCII names, more than 80 characters) a short hash of the
        whole name follows the readable part, so two names never share a folder: 'étude' -> runs/tude-1a2b3c4d."""
        import hashlib

        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", self.name).strip("-.")[:80].strip("-.")
        if slug != self.name:
            slug = f"{slug or 'study'}-{hashlib.sha256(self.name.encode('utf-8')).hexdigest()[:8]}"
        return Path("runs") / slug

    # ------------------------------------------------------------------ derived values
    @property
    def random_k(self) -> int:
        return self.localizers.random.k or self.localizers.probe.top_k

    def top_k_of(self, localizer: str = "probe") -> int:
        """K of a localizer's candidate set: the probe's top_k, or a causal localizer's own (default: the probe's)."""
        if localizer == "probe":
            return self.localizers.probe.top_k
        c = self.localizers.enabled_causal().get(localizer)
        if c is None:
            raise ConfigError(f"localizers.causal.{localizer}: not an enabled localizer of this study "
                              f"(enabled: {['probe', *self.localizers.enabled_causal()]})")
        return c.top_k or self.localizers.probe.top_k

    def resolved_precision(self):
        """`precision` resolved for the device the model will run on (models/precision.py); no model load."""
        from locaudit.models.loading import resolve_device
        from locaudit.models.precision import resolve_precision

        return resolve_precision(self.precision, resolve_device(self.model.device))

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

    def resolved_kl_text(self) -> str | None:
        """evaluation.kl_text with ${VAR} expanded and a file path made absolute; a corpus name as it is."""
        t = self.evaluation.config_fields().get("kl_text", EvalConfig.model_fields["kl_text"].default)
        if t is None:
            return None
        t = expand_env(str(t), "evaluation.kl_text")
        p = _resolve_path(t, Path(self.base_dir or "."))
        return str(p) if _looks_like_path(t) or p.is_file() else t

    def eval_protocol(self) -> dict[str, Any]:
        """Every result-defining EvalConfig field, defaults included, as trial keys hash it (a KL text
        file by its content, so moving it keeps keys and editing it changes them)."""
        cfg = EvalConfig(**self.evaluation.config_fields()).model_dump(mode="json")
        out = {k: v for k, v in sorted(cfg.items())
               if k not in EVAL_NOT_IN_KEYS and not (k in EVAL_KEYED_IF_SET and v is None)}
        kl = self.resolved_kl_text()
        if kl is not None and Path(kl).is_file():
            out["kl_text"] = "file:" + _content_id(kl)
        return out

    def model_identity(self) -> dict:
        return {"name": self.model.name, "dtype": _canonical_dtype(self.model.dtype)}

    def to_json(self) -> dict:
        return self.model_dump(mode="json")


def _canonical_dtype(d: str) -> str:
    from locaudit.models.dtypes import dtype_name

    return dtype_name(d)


def expand_env(text: str, field: str) -> str:
    """Expand ${VAR} and ${VAR:-default}; an unset variable without a default is an error naming `field`."""

    def sub(m: re.Match) -> str:
        var, default = m.group(1), m.group(2)
        val = os.environ.get(var)
        if (val is None or val == "") and var == "LOCAUDIT_DATA":  # unset: the first data root that exists
            from locaudit.data.registry import default_root, env_root

            old = env_root()  # the deprecated LOCAUDIT_SHARED_DATA (warned)
            root = old[1] if old is not None else default_root()
            val = str(root) if root is not None else None
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
    errors = e.errors()
    if len(errors) > 20:
        lines[0] += f"; the first 20 of {len(errors)}"
    for err in errors[:20]:
        loc = ".".join(str(x) for x in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (not part of the study schema; check its spelling)"
        lines.append(f"  {loc}: {msg} (value: {bounded_repr(err.get('input'))})")
    return "\n".join(lines)


MAX_STUDY_BYTES = 1 << 20  # a study file is a page of YAML
MAX_YAML_ALIASES = 32  # a few anchors/aliases are fine; a "billion laughs" needs many more


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses more than MAX_YAML_ALIASES aliases (bounding what the file can expand to)."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} YAML aliases (*name) at line {mark.line + 1}; "
                                     "write the values out instead")
        return super().compose_node(parent, index)


_OLD_AUTOCAST = (("localizers", "probe", "autocast"), ("evaluation", "autocast"),
                 ("optimal", "train_options", "autocast"), ("optimal", "train_options", "prefix_dtype"))


def migrate_old_fields(obj: dict, source: str = "<study>") -> dict:
    """Study files written before the precision policy keep loading: the per-step autocast fields are
    dropped with a message naming the study-level field `precision` that replaces them."""
    import copy

    out = None
    for path in _OLD_AUTOCAST:
        node = obj
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] in node:
            out = out if out is not None else copy.deepcopy(obj)
            holder = out
            for part in path[:-1]:
                holder = holder[part]
            old = holder.pop(path[-1])
            name = ".".join(path)
            what = ("gone: cached prefix states are exact" if path[-1] == "prefix_dtype" else
                    f"replaced by the study field `precision` (now {obj.get('precision', 'auto')!r}: bf16 "
                    "where this machine runs it faster, else fp32)")
            log.warning(f"{source}: {name} = {str(old)[:20]!r} is {what}; remove it")
    return out if out is not None else obj


def parse_study(obj: Any, base_dir: str | Path = ".", source: str = "<study>") -> StudySpec:
    """Validate a study dict; errors name the field path and the value."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{source}: a study must be a YAML mapping, got {type(obj).__name__}")
    if "base_dir" in obj:
        raise ConfigError(f"{source}: base_dir: set by locaudit, not by the study file")
    obj = migrate_old_fields(obj, source)
    try:
        spec = StudySpec.model_validate({**obj, "base_dir": str(Path(base_dir).resolve())})
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None
    spec.resolved_data_spec()  # fail early on a missing data file or variable, naming the field
    spec.resolved_mc_path()
    spec.resolved_model_name()
    spec.resolved_judge()
    return spec


def spec_of_run(meta: Any, source: str = "the run's ledger (meta 'spec')") -> StudySpec:
    """The StudySpec a run recorded (`StudySpec.to_json()` in its ledger's meta), validated; fields of older
    versions migrated (`migrate_old_fields`). A ConfigError names `source`, the field and the value at fault."""
    if isinstance(meta, StudySpec):
        return meta
    if not isinstance(meta, dict) or not meta:
        raise ConfigError(f"{source}: no study spec recorded (got {bounded_repr(meta)})")
    try:
        return StudySpec.model_validate(migrate_old_fields(meta, source))
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def load_study(path: str | Path) -> StudySpec:
    """Read and validate a study YAML file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"study file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"study file {path} is not a file")
    if path.stat().st_size > MAX_STUDY_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes; a study file is at most {MAX_STUDY_BYTES} bytes")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})") from None
    try:
        obj = yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e)[:500]}") from None
    return parse_study(obj, path.parent, str(path))
