"""The `iti` and `optimal` sections of a study file: the edits made at each candidate location and their
hyper-parameter grids."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from locaudit.edit.config import TrainConfig
from locaudit.fields import from_config
from locaudit.study.spec_base import GROUPS, Group, Seed, _Strict, check_config_fields


class ITISpec(_Strict):
    enabled: bool = Field(True, description="Run ITI (heuristic) edits.")
    # |alpha| <= 1000, as the CLI's --alpha: 30x the strengths in the literature (cli/options.MAX_ALPHA says why)
    alphas: list[Annotated[float, Field(ge=-1e3, le=1e3)]] = Field(default_factory=lambda: [5.0, 15.0], min_length=1,
                                                                  description="Alpha grid (|alpha| <= 1000).")
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
    # TrainConfig's own fields, set by name (their type, default, range and description are TrainConfig's)
    objective: from_config(TrainConfig, "objective")
    rank: from_config(TrainConfig, "rank")
    epochs: from_config(TrainConfig, "epochs")
    batch_size: from_config(TrainConfig, "batch_size")
    max_train_pairs: int | None = Field(None, ge=1, description="Subsample the training pairs (seeded by data.seed).")
    max_val_pairs: int | None = Field(256, ge=1, description="Subsample the validation pairs (training curve only).")
    train_options: dict[str, Any] = Field(default_factory=dict, description="Further TrainConfig fields "
                                          "(edit/config.py), e.g. {warmup_ratio: 0.1}; precision is the "
                                          "study's own field.")
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1, description="Training seeds (replicates).")
    localizers: list[Group] = Field(default_factory=lambda: list(GROUPS), description="Where to edit.")
    batch_edits: int = Field(1, ge=1, description="Train up to this many edits with equal hyper-parameters in "
                             "one pass (speed only; not part of trial keys).")
    dose_steps: list[float] = Field(default_factory=list, description="A dose curve per optimal edit (matched "
                                    "collateral damage, docs/verdict.md): the edit's state after these optimizer steps "
                                    "(a value in (0, 1): a fraction of the planned steps, which with early stopping are the "
                                    "cap's, train_options.max_epochs; >= 1: a step count, what an edit stopping "
                                    "early by patience still reaches) is also scored on the primary metric and KL. "
                                    "Empty: none (part of trial keys only when set).")
    dose_localizers: list[Group] = Field(default_factory=lambda: list(GROUPS), description="The localizer groups "
                                         "whose edits get a dose curve (each point costs one evaluation; the "
                                         "matched-KL verdict compares top, random and all heads).")

    @field_validator("taus")
    @classmethod
    def _taus(cls, v: list[float]) -> list[float]:
        if any(not t > 0 for t in v):
            raise ValueError(f"taus must be > 0, got {v}")
        return v

    @field_validator("dose_steps")
    @classmethod
    def _dose_steps(cls, v: list[float]) -> list[float]:
        check_config_fields(TrainConfig, {"snapshot_steps": v}, set(), "", "TrainConfig field")
        return v

    @field_validator("train_options")
    @classmethod
    def _train_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_config_fields(TrainConfig, v, {"objective", "tau", "lr", "rank", "epochs", "batch_size", "seed",
                                             "progress", "precision", "snapshot_steps"},
                            "the study's own fields (taus, lr, rank, dose_steps, ...)", "TrainConfig field")
        return v
