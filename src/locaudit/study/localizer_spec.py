"""The `localizers` section of a study file: the probe's top-K heads, random K-head draws, single heads and
the causal localizers whose top-K heads are candidates of their own."""

from __future__ import annotations

import logging
import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from locaudit.study.spec_base import Seed, _Strict, bounded_repr, check_config_fields

log = logging.getLogger(__name__)


class ProbeSpec(_Strict):
    top_k: int = Field(16, ge=1, description="The candidate localization: the K heads of best validation accuracy.")
    l2: float = Field(1.0, gt=0, description="L2 penalty of the per-head logistic-regression probes (1/C; "
                      "1.0 = scikit-learn's default, as ITI uses).")
    collect_batch_size: int = Field(16, ge=1, description="Batch size when collecting head activations.")


class RandomSpec(_Strict):
    n: int = Field(20, ge=0, description="Number of random K-head draws (seeds seed_start..seed_start+n-1). "
                   "A rank p-value cannot go below 1/(n+1): 19 draws reach 0.05 for one test, 39 for two.")
    k: int | None = Field(None, ge=1, description="Heads per draw; default: probe.top_k.")
    seed_start: Seed = Field(0, description="First draw seed.")
    seeds: list[Seed] | None = Field(None, description="Explicit draw seeds (replaces n / seed_start).")
    exclude_top: bool = Field(False, description="Never draw one of the probe's top-K heads.")
    max_overlap: float | None = Field(0.5, ge=0, le=1, description="Redraw (seeded, reproducibly) a draw that "
                                      "shares more than this fraction of its heads with the probe's top-K; null: "
                                      "never redraw. The report flags overlapping and duplicate draws either way.")
    iti_n: int | None = Field(None, ge=0, description="ITI uses only the first iti_n draws (default: all), e.g. "
                              "to fit a budget; the report then says how far that comparison is underpowered.")

    def draw_seeds(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else list(range(self.seed_start, self.seed_start + self.n))


class SingleSpec(_Strict):
    n: int = Field(0, ge=0, description="Number of distinct single heads sampled (a seeded permutation of all heads).")
    seed: Seed = Field(0, description="Seed of that permutation; raising n keeps the earlier heads.")
    top: int = Field(0, ge=0, description="Also edit each of the probe's N best heads alone (locations "
                     "ranked#0..ranked#N-1): does the best-probed head on its own match full alignment?")
    heads: list[str] = Field(default_factory=list, description="Listed single heads, e.g. ['L12H3', '20.1'].")
    exclude_top: bool = Field(False, description="Never sample one of the probe's top-K heads.")

    @field_validator("heads")
    @classmethod
    def _heads(cls, v: list[str]) -> list[str]:
        from locaudit.heads import HeadSet

        seen: dict = {}
        for s in v:
            hs = HeadSet.parse(s)
            if len(hs) != 1:
                raise ValueError(f"single head {s!r} names {len(hs)} heads; give one head per entry")
            if hs in seen:  # two spellings of one head (L1H1, 1.1) would make two trials of one head
                msg = f"localizers.single.heads: {s!r} is {seen[hs]!r} again; merged into one trial"
                warnings.warn(msg, UserWarning, stacklevel=2)
                log.warning(msg)
            else:
                seen[hs] = s
        return list(seen.values())


class CausalSpec(BaseModel):
    """A causal localizer (localize/registry.py: activation or attribution patching, or another registered one) as a
    study runs it: its top-K heads become a candidate location, edited and compared with the same random draws as
    the probe's. Further keys are fields of the localizer's config (PatchingConfig: corruption, noise_scale,
    positions, max_pairs, ...), checked against it by LocalizerSpec."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    enabled: bool = Field(True, description="Rank heads with this localizer and edit at its top-K.")
    top_k: int | None = Field(None, ge=1, description="Heads in its candidate set; default: probe.top_k.")
    split: Literal["train", "val"] = Field("train", description="Preference pairs of this split are patched "
                                           "(never the evaluation split).")

    @property
    def options(self) -> dict[str, Any]:
        return dict(sorted((self.model_extra or {}).items()))


class LocalizerSpec(_Strict):
    probe: ProbeSpec = Field(default_factory=ProbeSpec, description="Probing: the candidate top-K heads.")
    causal: dict[str, CausalSpec] = Field(default_factory=dict, description="Causal localizers by registered name "
                                          "(localize/registry.py: patching = activation patching per head, "
                                          "attribution = its gradient approximation), e.g. {patching: {top_k: 16, "
                                          "corruption: noise}}; each one's top-K is a candidate of its own. A "
                                          "registered name also works as a key of `localizers` itself "
                                          "(localizers.patching).")
    random: RandomSpec = Field(default_factory=RandomSpec, description="Random K-head draws (the control).")
    single: SingleSpec = Field(default_factory=SingleSpec, description="Single heads (sampled and/or listed).")
    all: bool = Field(True, description="Include every head of every layer (full alignment).")

    @model_validator(mode="before")
    @classmethod
    def _named_causal(cls, v: Any) -> Any:
        """`localizers.NAME` for a registered causal localizer NAME is `localizers.causal.NAME` (null: none)."""
        from locaudit.localize.registry import causal_names

        if not isinstance(v, dict):
            return v
        named = [k for k in v if k in causal_names()]
        if not named:
            return v
        out = {k: x for k, x in v.items() if k not in named}
        causal = dict(out.get("causal") or {})
        for k in named:
            if k in causal:
                raise ValueError(f"{k} is given twice: as localizers.{k} and localizers.causal.{k}")
            if v[k] is not None:
                causal[k] = v[k]
        out["causal"] = causal
        return out

    @model_validator(mode="after")
    def _registered(self) -> "LocalizerSpec":
        from locaudit.localize.registry import causal_localizer, causal_names

        for name, c in self.causal.items():
            if name not in causal_names():
                raise ValueError(f"causal.{name}: not a registered causal localizer; registered: {list(causal_names())}")
            try:
                check_config_fields(causal_localizer(name).config, c.options, {"format", "top_k"},
                                    "the study (data.format, top_k)", "localizer option")
            except ValueError as e:
                raise ValueError(f"causal.{name}: {e} (options: {bounded_repr(c.options)})") from None
        return self

    def enabled_causal(self) -> dict[str, CausalSpec]:
        """The enabled causal localizers by name, in the registry's order."""
        from locaudit.localize.registry import causal_names

        return {m: c for m in causal_names() if (c := self.causal.get(m)) is not None and c.enabled}
