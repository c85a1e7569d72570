"""The precision policy: `auto` follows the hardware, every spelling is one vocabulary, and the resolved
precision reaches metas and cache keys."""

from __future__ import annotations

import warnings

import pytest
import torch

from locaudit.errors import ConfigError
from locaudit.models import precision as P
from locaudit.models.tiny import tiny_model
from locaudit.models.precision import resolve_precision as _P  # resolved once, as entry points do


@pytest.fixture(autouse=True)
def _fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LOCAUDIT_CPU_CAPABILITY", raising=False)
    P.clear_cache()
    yield
    P.clear_cache()


@pytest.mark.parametrize("cap,expected", [("AVX2", "fp32"), ("AVX512", "fp32"), ("DEFAULT", "fp32"),
                                          ("AMX", "bf16"), ("AVX512_BF16", "bf16")])
def test_auto_follows_faked_capability(monkeypatch, cap, expected):
    monkeypatch.setenv("LOCAUDIT_CPU_CAPABILITY", cap)
    r = P.resolve_precision("auto", "cpu")
    assert r.name == expected and r.requested == "auto" and r.capability == cap
    assert cap in r.reason
    assert r.meta()["cpu_capability"] == cap and r.meta()["precision"] == expected


def _forms(autocast: float, weights: float, fp32: float = 1.0) -> dict:
    """Per-phase seconds as measure_forms returns them (the same ratio in both phases)."""
    return {"fp32": {"forward": fp32, "train": 2 * fp32}, "autocast": {"forward": autocast, "train": 2 * autocast},
            "bf16-weights": {"forward": weights, "train": 2 * weights}}


def test_auto_picks_fp32_when_bf16_hardware_measures_slow(monkeypatch):
    """An AMX machine where the whole-job check finds bf16 slower (e.g. a throttled VM) stays on fp32;
    the measurement runs once per machine and is cached on disk."""
    calls = []
    monkeypatch.setattr(P, "_real_cpu_capability", lambda: "AMX")
    monkeypatch.setattr(P, "measure_forms", lambda *a, **k: calls.append(1) or _forms(1.6, 1.05))
    assert P.resolve_precision("auto", "cpu").name == "fp32"
    P._resolve.cache_clear()  # a new process: the disk cache answers, no second measurement
    r = P.resolve_precision("auto", "cpu")
    assert r.name == "fp32" and r.form == "" and "0.95x" in r.reason and calls == [1]


@pytest.mark.parametrize("autocast,weights,form", [(0.5, 0.4, "bf16-weights"), (0.4, 0.5, "autocast")])
def test_auto_picks_the_faster_bf16_form(monkeypatch, autocast, weights, form):
    monkeypatch.setattr(P, "_real_cpu_capability", lambda: "AMX")
    monkeypatch.setattr(P, "measure_forms", lambda *a, **k: _forms(autocast, weights))
    r = P.resolve_precision("auto", "cpu")
    assert r.name == "bf16" and r.form == form and "2.50x" in r.reason and r.autocast_dtype == torch.bfloat16
    assert r.meta()["precision_form"] == form


def test_choose_form_weighs_the_whole_job():
    """A form that wins the forward pass but loses training by more is not chosen: forward counts twice,
    training once (PHASE_WEIGHTS), and bf16 must win the total by MIN_SPEEDUP."""
    fast_fwd_slow_train = {"fp32": {"forward": 1.0, "train": 1.0}, "autocast": {"forward": 0.8, "train": 1.7},
                           "bf16-weights": {"forward": 0.9, "train": 1.6}}
    assert P.choose_form(fast_fwd_slow_train)[0] == "fp32"
    just_below = _forms(1 / 1.05, 1 / 1.09)
    assert P.choose_form(just_below)[0] == "fp32"
    assert P.choose_form(_forms(1 / 1.2, 1 / 1.15))[0] == "autocast"


def test_avx2_never_measures(monkeypatch):
    monkeypatch.setattr(P, "_real_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(P, "measure_forms", lambda *a, **k: pytest.fail("must not measure on AVX2"))
    assert P.resolve_precision("auto", "cpu").name == "fp32"


def test_real_measurement_times_every_form_and_phase():
    lm = tiny_model("llama")
    m = P.measure_forms(batch=1, seq=16, repeats=1, model=lm.model)
    assert set(m) == set(P.FORMS)
    assert all(v > 0 and v == v for f in m.values() for v in f.values())
    assert set(P.choose_form(m)[0:1]) <= {"fp32", "autocast", "bf16-weights"}
    assert all(not p.requires_grad for p in lm.model.parameters())  # the model is left as it was


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_weights_form_is_bit_identical_to_autocast_and_restores(family):
    """`compute` in the bf16-weights form gives autocast's logits bit for bit, with fp32 weights back after."""
    lm = tiny_model(family)
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    auto = P.ResolvedPrecision("bf16", "bf16", "cpu", "AVX2", "test", "autocast")
    weights = P.ResolvedPrecision("bf16", "bf16", "cpu", "AVX2", "test", "bf16-weights")
    with torch.no_grad():
        with auto.compute(lm.model, lm.dtype):
            a = lm.model(input_ids=ids).logits
        with weights.compute(lm.model, lm.dtype):
            assert any(p.dtype == torch.bfloat16 for p in lm.model.parameters())
            b = lm.model(input_ids=ids).logits
    assert torch.equal(a, b)
    for n, p in lm.model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n


def test_explicit_precision_is_kept_and_warned_when_emulated(monkeypatch, caplog):
    monkeypatch.setenv("LOCAUDIT_CPU_CAPABILITY", "AVX2")
    r = P.resolve_precision("bf16", "cpu")
    assert r.name == "bf16" and "emulates" in r.reason
    assert P.resolve_precision("fp32", "cpu").autocast_dtype is None


@pytest.mark.parametrize("bad", ["fp8", "gpu", "", "bfloat"])
def test_bad_spelling_names_choices(bad):
    with pytest.raises(ConfigError, match="auto, fp32, bf16, fp16"):
        P.parse_precision(bad, "study.precision")


def test_as_precision_coercions():
    assert P.as_precision(None).requested == "auto"
    assert P.as_precision(torch.bfloat16).name == "bf16"
    assert P.as_precision("float16").name == "fp16"
    r = P.resolve_precision("fp32")
    assert P.as_precision(r) is r
    with pytest.raises(ConfigError):
        P.as_precision(torch.int8)


@pytest.mark.parametrize("bad", ["auto", "fp32", None, torch.bfloat16])
def test_functions_below_the_entry_points_take_only_a_resolved_precision(bad):
    """"auto", None or a bare string below the entry points is a TypeError naming the function, so that no
    depth of a job can read them differently (None once meant fp32 there while configs meant auto)."""
    from locaudit.evaluate.klce import kl_ce
    from locaudit.localize.activations import collect_activations

    lm = tiny_model("llama")
    with pytest.raises(TypeError, match="ResolvedPrecision"):
        collect_activations(lm, ["a b c"], precision=bad, progress=False)
    with pytest.raises(TypeError, match="ResolvedPrecision"):
        kl_ce(lm, None, ["a b c d"], precision=bad)
    assert P.require_resolved(P.resolve_precision("fp32"), "x").name == "fp32"


def test_autocast_context_is_noop_for_fp32_and_same_dtype_weights():
    x = torch.randn(4, 4)
    with P.resolve_precision("fp32").autocast():
        assert (x @ x).dtype == torch.float32
    with P.resolve_precision("bf16").autocast(torch.float32):
        assert (x @ x).dtype == torch.bfloat16
    with P.resolve_precision("bf16").autocast(torch.bfloat16):  # weights already bf16: nothing to cast
        assert not torch.is_autocast_enabled("cpu")


def test_cache_keys_and_metas_carry_precision(monkeypatch, tmp_path):
    from locaudit.localize.activations import activation_key
    from locaudit.data.prompts import PromptFormat

    lm = tiny_model("llama")
    k32 = activation_key(lm, "d", PromptFormat("plain"), precision=_P('fp32'))
    k16 = activation_key(lm, "d", PromptFormat("plain"), precision=_P('bf16'))
    assert k32 != k16
    monkeypatch.setenv("LOCAUDIT_CPU_CAPABILITY", "AVX2")
    assert activation_key(lm, "d", PromptFormat("plain"), precision=_P('auto')) == k32  # auto resolves to fp32 here


def test_eval_result_and_edit_meta_record_precision(monkeypatch):
    from locaudit.data.types import PreferencePair
    from locaudit.edit.train import train_edit
    from locaudit.heads import HeadSet

    monkeypatch.setenv("LOCAUDIT_CPU_CAPABILITY", "AVX2")
    lm = tiny_model("llama", n_layers=2)
    pairs = [PreferencePair(f"q{i}", f"Q{i}?", "yes", "no") for i in range(4)]
    edit, _ = train_edit(lm, HeadSet.parse("L1H0"), pairs, None, progress=False, epochs=1,
                         reference_disk_cache=False)
    meta = edit.meta["precision"]
    assert meta["precision"] == "fp32" and meta["precision_requested"] == "auto" and meta["cpu_capability"] == "AVX2"


def test_old_field_names_keep_loading():
    from locaudit.edit.config import TrainConfig
    from locaudit.evaluate.runner import EvalConfig

    with pytest.warns(FutureWarning, match="precision"):
        assert TrainConfig(autocast=False).precision == "fp32"
    with pytest.warns(FutureWarning, match="precision"):
        assert TrainConfig(autocast=True).precision == "auto"
    with pytest.warns(FutureWarning, match="prefix_dtype"):
        TrainConfig(prefix_dtype="bf16")
    with pytest.warns(FutureWarning, match="precision"):
        assert EvalConfig(autocast="bf16").precision == "bf16"
    with pytest.warns(FutureWarning):
        assert EvalConfig(autocast="none").precision == "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TrainConfig().precision == "auto" and EvalConfig().precision == "auto"


def test_old_study_fields_load_with_a_message(tmp_path, caplog):
    from locaudit.study.spec import load_study

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "Q?", "chosen": "a", "rejected": "b"}\n')
    study = tmp_path / "s.yaml"
    study.write_text(f"""name: old
model: {{name: "tiny:llama"}}
data: {{spec: "pairs:{data}"}}
localizers: {{probe: {{top_k: 2, autocast: bf16}}}}
optimal: {{train_options: {{autocast: false, prefix_dtype: bf16}}}}
evaluation: {{metrics: [pref], autocast: bf16}}
""")
    with caplog.at_level("WARNING"):
        spec = load_study(study)
    msgs = caplog.text
    for old in ("localizers.probe.autocast", "evaluation.autocast", "optimal.train_options.autocast",
                "optimal.train_options.prefix_dtype"):
        assert old in msgs
    assert "`precision`" in msgs and spec.precision == "auto"
    assert "autocast" not in spec.optimal.train_options


def test_study_precision_field_validated(tmp_path):
    from locaudit.study.spec import load_study

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "Q?", "chosen": "a", "rejected": "b"}\n')
    study = tmp_path / "s.yaml"
    study.write_text(f'name: x\nprecision: fp8\ndata: {{spec: "pairs:{data}"}}\n')
    with pytest.raises(ConfigError, match="precision"):
        load_study(study)


@pytest.mark.parametrize("args,needle", [(["--precision", "fp8"], "--precision"), (["--device", "gpu"], "--device"),
                                         (["--dtype", "int4"], "--dtype")])
def test_cli_rejects_bad_choices_at_parse_time(args, needle):
    from typer.testing import CliRunner

    from locaudit.cli.main import app

    r = CliRunner().invoke(app, ["collect", "--data", "pairs:nowhere.jsonl", "--out", "x", *args])
    assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output


def test_study_records_precision_per_trial_and_in_the_report(monkeypatch, tmp_path):
    """A tiny study with the real steps: every trial that runs the model records the precision it ran at and
    the CPU capability in its ledger row (trials.csv columns), and the report header names them."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from eval_fixtures import write_truthfulqa

    from locaudit.study.ledger import Ledger
    from locaudit.study.report import build_report
    from locaudit.study.runner import run_study
    from locaudit.study.spec import parse_study

    monkeypatch.setenv("LOCAUDIT_CPU_CAPABILITY", "AVX2")
    csv = write_truthfulqa(tmp_path / "data")
    spec = parse_study({"name": "p", "model": {"name": "tiny:llama"}, "data": {"spec": f"truthfulqa:{csv}"},
                        "localizers": {"probe": {"top_k": 2}, "random": {"n": 1}, "single": {"n": 0}, "all": False},
                        "iti": {"alphas": [1.0]}, "optimal": {"enabled": False},
                        "evaluation": {"metrics": ["mc"], "baseline": True}}, tmp_path)
    run = tmp_path / "run"
    summary = run_study(spec, run, progress=False)
    assert summary.failed == 0
    with Ledger(run) as led:
        rows = led.rows()
        assert led.get_meta("precision")["precision"] == "fp32"
    ran = [r for r in rows if r["kind"] in ("collect", "baseline", "iti")]
    assert ran and all(r["artifacts"]["precision"] == "fp32" and r["artifacts"]["cpu_capability"] == "AVX2"
                       for r in ran)
    rep = build_report(run, n_resamples=99)
    html = rep.index.read_text()
    assert "Precision fp32" in html and "CPU capability AVX2" in html
    import pandas as pd

    trials = pd.read_csv(rep.out_dir / "trials.csv")
    assert set(trials.loc[trials["kind"] == "iti", "precision"]) == {"fp32"}


def test_hase_keys_follow_the_device_auto_resolves_to(monkeypatch, tmp_path):
    """A Hase study with `device: auto` on a GPU keys its trials by the GPU's precision (bf16), not by the
    CPU's: the key says what the compute runs in. On a CPU-only machine the same spec keys fp32 (AVX2)."""
    from locaudit.study.hase.spec import load_hase_spec

    (tmp_path / "facts.jsonl").write_text('{"subject": "Paris", "prompt": "Paris is in", "target": "France"}\n')
    (tmp_path / "hase.yaml").write_text("name: h\nmodel: {name: 'tiny:llama', device: auto}\nprecision: auto\n"
                                        "facts: {path: facts.jsonl}\n")
    spec = load_hase_spec(tmp_path / "hase.yaml")
    monkeypatch.setenv("LOCAUDIT_CPU_CAPABILITY", "AVX2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    P.clear_cache()
    cpu_key = spec.identity()["precision"]
    assert cpu_key == "fp32" and spec.resolved().device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    P.clear_cache()
    try:
        assert spec.resolved().device == "cuda"
        assert spec.identity()["precision"] == "bf16"
    finally:
        P.clear_cache()


@pytest.mark.parametrize("autocast,weights,form", [(0.5, 0.4, "bf16-weights"), (0.4, 0.5, "autocast"),
                                                   (1.5, 1.3, "bf16-weights")])
def test_explicit_bf16_runs_in_the_form_this_machine_runs_faster(monkeypatch, autocast, weights, form):
    """A study resolved `auto` -> bf16 hands "bf16" to its configs: they must run the same form, and so does
    an explicit bf16 where bf16 is slower than fp32 (it is kept, as asked)."""
    monkeypatch.setattr(P, "_real_cpu_capability", lambda: "AMX")
    monkeypatch.setattr(P, "measure_forms", lambda *a, **k: _forms(autocast, weights))
    r = P.resolve_precision("bf16", "cpu")
    assert r.name == "bf16" and r.form == form
    a = P.resolve_precision("auto", "cpu")
    assert a.form == (form if a.name == "bf16" else "")


def test_a_compute_context_built_but_not_entered_changes_nothing():
    """`compute` is lazy: building the context (as a function may, before its `with`) must not swap weights or
    switch autocast on; only entering it does, and leaving it restores the fp32 weights."""
    lm = tiny_model("llama")
    prec = P.ResolvedPrecision("bf16", "bf16", "cpu", "AVX2", "test", "bf16-weights")
    ctx = prec.compute(lm.model, lm.dtype)
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())
    assert not torch.is_autocast_enabled("cpu")
    with ctx:
        assert any(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())
    del ctx
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())
