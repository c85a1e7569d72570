"""Issue 27: every numeric config field has its range in its type, and the three magnitude bounds of the first
hardening round reject no legitimate input.

- every float field of the study spec, TrainConfig, EvalConfig, PatchingConfig and the Hase configs refuses NaN
  and +-inf; every seed refuses negative values and values beyond 32 bits;
- a study file with such a value is one ConfigError naming the field path and the value;
- the bounds: an ITI edit at the largest accepted alpha on a head with sigma 20 verifies (1e4 refused it);
  a metric that is a Unix time or a large token count is recordable, 1e16 is not.
"""

from __future__ import annotations

import math
import sys
import typing

import pytest
import torch
from pydantic import BaseModel, ValidationError

from locaudit.errors import ConfigError, DataError


def _classes() -> list[tuple[type[BaseModel], dict]]:
    from locaudit.edit.config import TrainConfig
    from locaudit.edit.layer_edit import LayerEditConfig
    from locaudit.evaluate.runner import EvalConfig
    from locaudit.localize.corruptions import PatchingConfig
    from locaudit.localize.tracing import TraceConfig
    from locaudit.study.hase import spec as hase
    from locaudit.study import spec as study

    return [(study.DataSpec, {"spec": "pairs:x.jsonl"}), (study.ProbeSpec, {}), (study.RandomSpec, {}),
            (study.SingleSpec, {}), (study.ITISpec, {}), (study.LRGrid, {}), (study.OptimalSpec, {}),
            (study.EvalSpec, {}), (study.VerdictSpec, {}), (study.ResourceSpec, {}), (TrainConfig, {}),
            (EvalConfig, {}), (PatchingConfig, {}), (LayerEditConfig, {}), (TraceConfig, {}),
            (hase.FactsSpec, {"path": "facts.jsonl"}), (hase.AnalysisSpec, {})]


def _base(tp):
    """(container, scalar type) of an annotation: (None | 'list' | 'tuple', float | int | other)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _base(typing.get_args(tp)[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base(args[0]) if len(args) == 1 else (None, object)
    if origin in (list, tuple):
        inner = _base(typing.get_args(tp)[0])
        return ("list" if origin is list else "tuple"), inner[1]
    return None, tp


def _numeric_fields():
    for cls, required in _classes():
        for name, f in cls.model_fields.items():
            container, scalar = _base(f.annotation)
            if scalar in (float, int) and scalar is not bool:
                yield pytest.param(cls, required, name, container, scalar, id=f"{cls.__name__}.{name}")


def _wrap(container, value, default):
    if container == "list":
        return [value]
    if container == "tuple":
        return tuple(value for _ in default)
    return value


@pytest.mark.parametrize("cls, required, name, container, scalar", list(_numeric_fields()))
def test_numeric_fields_refuse_what_makes_no_sense(cls, required, name, container, scalar):
    default = cls.model_fields[name].get_default(call_default_factory=True)
    bad = [float("nan"), float("inf"), float("-inf")] if scalar is float else []
    if "seed" in name:
        bad += [-1, 2**32]
    for v in bad:
        with pytest.raises((ValidationError, ConfigError, ValueError)) as ei:
            cls(**{**required, name: _wrap(container, v, default)})
        assert name in str(ei.value), (name, v, str(ei.value)[:300])
    if default is not None:  # and the default itself is in range
        cls(**{**required, name: default})


def test_a_study_value_out_of_range_is_one_error_naming_field_and_value(tmp_path):
    from locaudit.study.spec import parse_study

    (tmp_path / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    base = {"name": "r", "model": {"name": "tiny:llama"}, "data": {"spec": "pairs:pairs.jsonl"}}
    for over, where, shown in [
        ({"data": {"spec": "pairs:pairs.jsonl", "seed": -1}}, "data.seed", "-1"),
        ({"localizers": {"random": {"seeds": [3, -2]}}}, "localizers.random.seeds.1", "-2"),
        ({"optimal": {"seeds": [2**40]}}, "optimal.seeds.0", str(2**40)),
        ({"optimal": {"train_options": {"weight_decay": math.inf}}}, "weight_decay", "inf"),
        ({"localizers": {"patching": {"noise_scale": math.inf}}}, "noise_scale", "inf"),
        ({"localizers": {"patching": {"pair_seed": -5}}}, "pair_seed", "-5"),
    ]:
        with pytest.raises(ConfigError) as ei:
            parse_study({**base, **over}, tmp_path, "r.yaml")
        msg = str(ei.value)
        assert where in msg and shown in msg, (where, msg)


def test_train_config_names_the_field_and_value():
    from locaudit.edit.config import TrainConfig

    for kw, needle in [({"seed": -1}, "TrainConfig.seed = -1"), ({"weight_decay": math.inf}, "TrainConfig.weight_decay = inf"),
                       ({"min_delta": math.nan}, "TrainConfig.min_delta = nan")]:
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("+", r"\+")):
            TrainConfig.make(**kw)


def test_seed_options_are_ranged_at_parse_time(monkeypatch, capsys):
    from locaudit.cli.main import main

    for args in (["localize", "--out", "o", "--data", "pairs:x", "--seed", "-1"],
                 ["judge", "train", "--out", "o", "--seed", "-1"],
                 ["collect", "--out", "o", "--data", "pairs:x", "--seed", str(2**32)]):
        monkeypatch.setattr(sys, "argv", ["locaudit", *args])
        capsys.readouterr()
        with pytest.raises(SystemExit) as ei:
            main()
        out = capsys.readouterr()
        text = out.err + out.out
        errs = [ln for ln in text.splitlines() if ln.startswith("error:")]
        assert ei.value.code == 2 and len(errs) == 1 and "--seed" in errs[0] and "[0, 4294967295]" in errs[0], text


def test_the_edit_bound_refuses_overflow_but_no_in_range_alpha():
    """|alpha * theta| is bounded by float16's largest value: the largest alpha the CLI and studies accept (1000)
    on a head whose activation std along the direction is 20 (theta = 20 u) verifies; an fp16 overflow does not."""
    from locaudit.cli.options import MAX_ALPHA
    from locaudit.edit.base import MAX_EDIT_VALUE
    from locaudit.edit.iti import ITIEdit
    from locaudit.heads import HeadSet

    assert MAX_EDIT_VALUE == float(torch.finfo(torch.float16).max)
    L, H, D = 2, 2, 4
    theta = torch.zeros(L, H * D)
    theta[1, :D] = 20.0 * torch.tensor([1.0, 0.0, 0.0, 0.0])  # sigma 20 along a unit direction
    edit = ITIEdit(theta, alpha=MAX_ALPHA, heads=HeadSet.parse("L1H0"), n_heads=H)
    edit.verify()  # |alpha * theta| = 2e4: a legitimate (if strong) edit
    with pytest.raises(DataError, match="above the bound"):
        edit.with_alpha(4 * MAX_ALPHA).verify()  # 8e4: inf in an fp16 run


def test_the_metric_bound_admits_every_genuine_metric():
    from locaudit.study.ledger import METRIC_BOUND, metric_problem

    for v in (0.0, 1.0, -250.0, 1.7e9, 3.2e12, 2**40):  # rates, log-prob sums, Unix times, token counts
        assert metric_problem(v) is None, v
    assert METRIC_BOUND < 2**53  # every integer up to it is exact in float64
    for v in (1e16, -1e300, 1e308):
        assert metric_problem(v) is not None, v
