"""The precision policy: `auto` follows the hardware, every spelling is one vocabulary, and the resolved
precision reaches metas and cache keys."""

from __future__ import annotations

import warnings

import pytest
import torch

from locaudit.errors import ConfigError
from locaudit.models import precision as P
from locaudit.models.tiny import tiny_model


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


def test_auto_picks_fp32_when_bf16_hardware_measures_slow(monkeypatch):
    """An AMX machine where the measured check finds bf16 slower (e.g. a throttled VM) stays on fp32;
    the measurement runs once per machine and is cached on disk."""
    calls = []
    monkeypatch.setattr(P, "_real_cpu_capability", lambda: "AMX")
    monkeypatch.setattr(P, "measure_bf16_speedup", lambda *a, **k: calls.append(1) or 0.6)
    assert P.resolve_precision("auto", "cpu").name == "fp32"
    P._resolve.cache_clear()  # a new process: the disk cache answers, no second measurement
    r = P.resolve_precision("auto", "cpu")
    assert r.name == "fp32" and "0.60x" in r.reason and calls == [1]


def test_auto_picks_bf16_when_measured_fast(monkeypatch):
    monkeypatch.setattr(P, "_real_cpu_capability", lambda: "AMX")
    monkeypatch.setattr(P, "measure_bf16_speedup", lambda *a, **k: 5.5)
    r = P.resolve_precision("auto", "cpu")
    assert r.name == "bf16" and "5.5x" in r.reason and r.autocast_dtype == torch.bfloat16


def test_avx2_never_measures(monkeypatch):
    monkeypatch.setattr(P, "_real_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(P, "measure_bf16_speedup", lambda *a, **k: pytest.fail("must not measure on AVX2"))
    assert P.resolve_precision("auto", "cpu").name == "fp32"


def test_real_measurement_is_a_ratio():
    s = P.measure_bf16_speedup(size=64, repeats=1)
    assert s > 0 and s == s


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
    assert P.as_precision(None).name == "fp32"
    assert P.as_precision(torch.bfloat16).name == "bf16"
    assert P.as_precision("float16").name == "fp16"
    r = P.resolve_precision("fp32")
    assert P.as_precision(r) is r
    with pytest.raises(ConfigError):
        P.as_precision(torch.int8)


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
    k32 = activation_key(lm, "d", PromptFormat("plain"), precision="fp32")
    k16 = activation_key(lm, "d", PromptFormat("plain"), precision="bf16")
    assert k32 != k16
    monkeypatch.setenv("LOCAUDIT_CPU_CAPABILITY", "AVX2")
    assert activation_key(lm, "d", PromptFormat("plain"), precision="auto") == k32  # auto resolves to fp32 here


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
