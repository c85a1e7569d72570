"""The study spec and `locaudit edit` take the TrainConfig / EvalConfig fields they set from the configs: type,
default, range and description are written once, in the config (locaudit/fields.py, cli/options.config_option)."""

from __future__ import annotations

import inspect

import pytest
from pydantic import ValidationError

from locaudit.edit.config import TrainConfig
from locaudit.evaluate.runner import EvalConfig
from locaudit.fields import config_field, described, from_config, sentence
from locaudit.study.spec import SPEED_ONLY, EvalSpec, OptimalSpec

SPEC_FIELDS = [(OptimalSpec, TrainConfig, n, "") for n in ("objective", "rank", "epochs", "batch_size")] + [
    (EvalSpec, EvalConfig, "max_new_tokens", ""), (EvalSpec, EvalConfig, "mc_primer", ""),
    (EvalSpec, EvalConfig, "batch_size", SPEED_ONLY), (EvalSpec, EvalConfig, "gen_batch_size", SPEED_ONLY),
    (EvalSpec, EvalConfig, "gen_edits_together", SPEED_ONLY)]


def test_sentence() -> None:
    assert sentence("passes over the pairs") == "Passes over the pairs."
    assert sentence("Already one.") == "Already one." and sentence(None) == "" and sentence("  ") == ""


@pytest.mark.parametrize("spec, config, name, note", SPEC_FIELDS, ids=lambda x: getattr(x, "__name__", x))
def test_spec_fields_are_the_configs(spec, config, name, note) -> None:
    s, c = spec.model_fields[name], config.model_fields[name]
    assert s.annotation == c.annotation and s.default == c.default and s.metadata == c.metadata
    assert s.description == " ".join(x for x in (sentence(c.description), note) if x)
    assert getattr(spec(), name) == getattr(config(), name)


def test_eval_spec_passes_its_evalconfig_fields_and_extras() -> None:
    e = EvalSpec(max_new_tokens=7, kl_max_tokens=64, metrics=["mc"])
    assert e.config_fields() == {"max_new_tokens": 7, "mc_primer": False, "batch_size": 32, "gen_batch_size": 16,
                                 "gen_edits_together": 8, "kl_max_tokens": 64}
    assert EvalConfig(**e.config_fields()).max_new_tokens == 7


def test_spec_fields_keep_the_configs_range_and_choices() -> None:
    with pytest.raises(ValidationError, match="rank"):
        OptimalSpec(rank=0)
    with pytest.raises(ValidationError, match="objective"):
        OptimalSpec(objective="ppo")
    with pytest.raises(ValidationError, match="max_new_tokens"):
        EvalSpec(max_new_tokens=0)
    assert OptimalSpec(objective="dpo", epochs=3).epochs == 3


def test_a_model_restating_a_field_follows_the_config() -> None:
    """A toy config and a model restating two of its fields: the restated ones change with the config."""
    from pydantic import BaseModel, Field

    class Toy(BaseModel):
        steps: int = Field(7, ge=2, le=9, description="optimizer steps")
        names: list[str] = Field(default_factory=lambda: ["a"], description="names")

    note = "Toy's."

    class Restating(BaseModel):
        steps: from_config(Toy, "steps", note)
        names: from_config(Toy, "names")

    r = Restating()
    assert r.steps == 7 and r.names == ["a"] and r.names is not Restating().names  # a fresh list each time
    assert Restating.model_fields["steps"].description == "Optimizer steps. Toy's."
    for bad in (1, 10):
        with pytest.raises(ValidationError, match="steps"):
            Restating(steps=bad)


def test_unknown_field_names_the_config() -> None:
    with pytest.raises(KeyError, match=r"TrainConfig has no field 'epoch'.*'epochs'"):
        config_field(TrainConfig, "epoch")
    assert described(TrainConfig, "epochs", "Note.") == "Passes over the training pairs. Note."


def test_edit_cli_options_are_trainconfig_fields() -> None:
    """Every `locaudit edit` option built from a TrainConfig field has its default and description."""
    from locaudit.cli.edit import edit

    params = inspect.signature(edit).parameters
    taken = {"objective": "objective", "tau": "tau", "beta": "beta", "lr": "lr", "epochs": "epochs",
             "batch_size": "batch_size", "grad_accum": "grad_accum", "rank": "rank", "reparam": "reparam",
             "train_seed": "seed", "max_length": "max_length", "frozen_prefix": "frozen_prefix",
             "progress": "progress"}
    for param, field in taken.items():
        opt, fi = params[param].default, TrainConfig.model_fields[field]
        assert opt.default == fi.default, param
        assert opt.help == sentence(fi.description), param


@pytest.mark.parametrize("args, message", [
    (["--tau", "0"], "--tau 0: must be a finite number > 0"),
    (["--epochs", "0"], "--epochs 0: must be an integer >= 1"),
    (["--train-seed", "-1"], "--train-seed -1: must be an integer in [0, 4294967295]"),
    (["--max-length", "7"], "--max-length 7: must be an integer >= 8"),
    (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
])
def test_edit_cli_ranges_are_trainconfigs(tmp_path, args, message) -> None:
    """The range of each number comes from TrainConfig's constraints: a value outside it fails at parse time."""
    from typer.testing import CliRunner

    from locaudit.cli.main import app
    from locaudit.cli.options import OptionValueError

    res = CliRunner().invoke(app, ["edit", "--data", "pairs:x", "--out", str(tmp_path / "e"), *args])
    assert res.exit_code != 0 and isinstance(res.exception, OptionValueError)
    assert str(res.exception) == message
