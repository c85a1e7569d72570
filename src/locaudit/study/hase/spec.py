"""A Hase-style study file (YAML) -> a validated `HaseSpec`.

```yaml
name: hase_smollm2
model: {name: smollm2-135m-instruct, dtype: fp32, device: auto}
precision: auto
facts: {path: "${LOCAUDIT_DATA:-../../shared/data}/rome/known_1000.json", known_top_k: 1, max_facts: 100}
tracing: {noise_scale: 3.0, n_noise: 3, kinds: [mlp, hidden], grid_facts: 4}
layers: "every:3"            # "all", "every:K", or a list of layer indices
editing: {problems: [error_injection], methods: [ft], ft: {steps: 10, lr: 1e-3, norm_bound: 2e-3}}
analysis: {tracing_kind: mlp, bootstrap: 1000, margin: 0.1, alpha: 0.05}
resources: {cpus: 1, gpus: 0}   # what one trial asks of a worker (`--executor ray`)
```
Relative paths resolve against the study file's folder; `${VAR:-default}` expands environment variables.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from locaudit.edit.layer_edit import LayerEditConfig
from locaudit.errors import ConfigError
from locaudit.evaluate.facts import PROBLEMS
from locaudit.io import file_sha256, stable_hash
from locaudit.localize.tracing import TraceConfig
from locaudit.models.precision import ResolvedPrecision, parse_precision, resolve_precision
from locaudit.study.spec import ResourceSpec


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # every number is finite
    name: str = Field("smollm2-135m-instruct", description="hub id, local folder, GGUF file or the embedded default")
    dtype: str = Field("fp32", description="weight dtype (fp32, bf16, fp16)")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto")
    trust_remote_code: bool = Field(False, description="run a hub model's own code (off unless you trust it)")


class FactsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # every number is finite
    path: str = Field(..., description="known_1000.json (ROME) or a JSONL of subject / prompt / target")
    known_top_k: int = Field(1, ge=1, description="a fact is known when its object's first token is among "
                                                  "the model's top-k next tokens (1 = greedy)")
    max_facts: int | None = Field(100, ge=1, description="edit and trace at most this many known facts "
                                                         "(a seeded sample; null = all)")
    n_neighbours: int = Field(3, ge=0, description="facts of the same relation scored for specificity")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the fact sample and of the counterfactual objects")


class EditingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # every number is finite
    problems: list[str] = Field(default_factory=lambda: ["error_injection"],
                                description=f"editing problems, of {list(PROBLEMS)}")
    methods: list[Literal["ft", "lora", "rome", "memit"]] = Field(default_factory=lambda: ["ft"],
                                                                  description="edit methods")
    ft: LayerEditConfig = Field(default_factory=lambda: LayerEditConfig(method="ft"),
                                description="settings of the constrained fine-tuning edit")
    lora: LayerEditConfig = Field(default_factory=lambda: LayerEditConfig(method="lora", lr=1e-2),
                                  description="settings of the rank-one LoRA edit with KL penalty")
    rome: LayerEditConfig = Field(default_factory=lambda: LayerEditConfig(method="rome", steps=20, lr=0.5,
                                                                          early_stop=5e-2),
                                  description="settings of ROME (value optimisation steps / lr, clamp, weight "
                                              "decay; C = E[k k^T] on the shipped Austen text, cov_tokens of it)")
    memit: LayerEditConfig = Field(default_factory=lambda: LayerEditConfig(method="memit", steps=20, lr=0.5,
                                                                           early_stop=5e-2, clamp_norm_factor=0.75),
                                   description="settings of MEMIT 'at layer l': the window of `window` layers "
                                               "centred on l (5, as Hase et al.), z's optimisation as rome's with "
                                               "MEMIT's clamp 0.75 x ||h||, mom2_update_weight lambda (15000), C as rome")

    @field_validator("problems")
    @classmethod
    def _problems(cls, v: list[str]) -> list[str]:
        bad = [p for p in v if p not in PROBLEMS]
        if bad or not v:
            raise ValueError(f"unknown editing problem(s) {bad}; choose from {list(PROBLEMS)}")
        return v

    def config(self, method: str) -> LayerEditConfig:
        if method not in ("ft", "lora", "rome", "memit"):
            raise ConfigError(f"editing.methods: unknown edit method {method!r}; choose from "
                              "['ft', 'lora', 'rome', 'memit']")
        return getattr(self, method).model_copy(update={"method": method})


class AnalysisSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # every number is finite
    tracing_kind: Literal["hidden", "mlp", "attn"] | None = Field(
        None, description="which tracing effect the regressions use (default: mlp for mlp_down edits, "
                          "attn for o_proj edits)")
    success: str = Field("rewrite_score", description="the edit-success metric regressed (rewrite_score, efficacy, ...)")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples of facts for the CIs")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="significance level of the verdict's tests")
    margin: float = Field(0.1, gt=0, lt=1, description="equivalence margin: a fraction of the fact-level oracle "
                                                       "gain over each layer's mean success")
    permutations: int = Field(2000, ge=0, description="permutations of tracing curves across facts (the verdict's "
                                                      "null that keeps each layer's mean); p floor 1/(n+1)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the bootstrap")


class HaseSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # every number is finite
    name: str = Field(..., description="study name (run folder default: runs/<name>)")
    description: str = Field("", description="free text shown in the report")
    model: ModelSpec = Field(default_factory=ModelSpec, description="the model")
    precision: str = Field("auto", description="auto|fp32|bf16|fp16 (auto = fp32 on AVX2 CPUs)")
    facts: FactsSpec = Field(..., description="the facts")
    tracing: TraceConfig = Field(default_factory=TraceConfig, description="causal tracing settings")
    layers: str | list[int] = Field("all", description="edited (and traced) layers: all, every:K, or a list")
    editing: EditingSpec = Field(default_factory=EditingSpec, description="per-layer edits")
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec, description="regressions and verdict")
    resources: ResourceSpec = Field(default_factory=ResourceSpec, description="what one trial asks of a worker "
                                    "(CPUs, GPUs) under `--executor ray`; not part of trial keys")
    base_dir: str = Field(".", description="folder of the study file (set when loading)")

    @field_validator("precision")
    @classmethod
    def _prec(cls, v: str) -> str:
        return parse_precision(v)

    def layer_list(self, n_layers: int) -> list[int]:
        """The edited layers of a model with `n_layers` layers ("every:K" always includes the last layer)."""
        v = self.layers
        if isinstance(v, list):
            bad = [l for l in v if not 0 <= l < n_layers]
            if bad:
                raise ConfigError(f"layers: {bad} are outside 0..{n_layers - 1}")
            return sorted(set(int(l) for l in v))
        if v == "all":
            return list(range(n_layers))
        if v.startswith("every:"):
            try:
                k = int(v.split(":", 1)[1])
            except ValueError:
                k = 0
            if k < 1:
                raise ConfigError(f"layers: {v!r}; write every:K with K >= 1")
            return sorted(set(range(0, n_layers, k)) | {n_layers - 1})
        raise ConfigError(f"layers: {v!r}; write all, every:K, or a list of layer indices")

    def facts_path(self) -> Path:
        from locaudit.study.spec import expand_env

        p = Path(expand_env(self.facts.path, "facts.path")).expanduser()
        p = p if p.is_absolute() else (Path(self.base_dir) / p).resolve()
        if not p.exists():
            raise ConfigError(f"facts.path: {self.facts.path!r} names {p}, which does not exist (relative paths "
                              f"resolve against {self.base_dir}; set LOCAUDIT_DATA if the data lies elsewhere)")
        return p

    def tracing_kind(self, site: str) -> str:
        return self.analysis.tracing_kind or ("mlp" if site == "mlp_down" else "attn")

    def resolved(self) -> ResolvedPrecision:
        """`precision` resolved for the device the model will run on (`device: auto` is a GPU where there is
        one), as every trial computes and keys it."""
        from locaudit.models.loading import resolve_device

        return resolve_precision(self.precision, resolve_device(self.model.device))

    def resolved_precision(self) -> str:
        return self.resolved().name

    def identity(self) -> dict:
        """What every trial key depends on: model, facts content, precision."""
        return {"model": self.model.model_dump(), "facts": file_sha256(self.facts_path()),
                "facts_spec": self.facts.model_dump(exclude={"path"}), "precision": self.resolved_precision()}

    def to_json(self) -> dict:
        return self.model_dump(mode="json")


def load_hase_spec(path: str | Path) -> HaseSpec:
    """Read and validate a Hase study file; errors name the file and field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist or is not a file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of study fields")
    data["base_dir"] = str(path.resolve().parent)
    try:
        spec = HaseSpec.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ConfigError(f"{path}: field {where}: {first['msg']} ({len(e.errors())} error(s))") from None
    for k, v in spec.model_dump().items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{path}: field {k} is not finite")
    return spec


def spec_hash(spec: HaseSpec) -> str:
    return stable_hash(spec.to_json())
