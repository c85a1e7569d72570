"""SmolLM2: baseline MC1/MC2 on a small test split; ITI at probed top-k heads moves KL monotonically in alpha."""

from __future__ import annotations

import pytest
from locaudit.models.precision import resolve_precision as _P  # resolved once, as entry points do

pytestmark = pytest.mark.slow


def test_smollm2_baseline_mc_and_iti_kl(smollm2, shared_data, tmp_path, monkeypatch):
    from locaudit.data.behaviour import load_behaviour
    from locaudit.data.prompts import PromptFormat
    from locaudit.edit.iti import fit_iti
    from locaudit.evaluate.klce import clear_memory_cache
    from locaudit.evaluate.runner import EvalConfig, evaluate_edit
    from locaudit.localize.activations import collect_probe_activations
    from locaudit.localize.probe import probe_activations

    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    clear_memory_cache()
    csv = shared_data / "truthfulqa" / "data" / "v1" / "TruthfulQA.csv"
    data = load_behaviour(f"truthfulqa:{csv}", max_questions=30)
    fmt = PromptFormat("plain")
    cfg = EvalConfig(progress=False, precision="auto", max_new_tokens=20, kl_max_tokens=512)

    base = evaluate_edit(smollm2, None, data, "test", ("mc", "kl", "ce"), config=cfg)
    print(f"\nbaseline: n_mc={base.n_mc} MC1={base.mc1:.3f}±{base.mc1_se:.3f} MC2={base.mc2:.3f}±{base.mc2_se:.3f} "
          f"CE={base.ce:.3f} KL={base.kl}")
    assert base.n_mc == len(data.questions("test")) > 0
    assert 0.0 <= base.mc1 <= 1.0 and 0.0 < base.mc2 < 1.0
    assert base.kl == 0.0 and 0.5 < base.ce < 10

    acts = collect_probe_activations(smollm2, data, fmt, progress=False, precision=_P('auto'))
    probe = probe_activations(acts)
    heads = probe.top(8)
    edit = fit_iti(acts, heads)
    kls = {}
    for alpha in (5.0, 15.0):
        r = evaluate_edit(smollm2, edit.with_alpha(alpha), data, "test", ("mc", "kl", "ce"), config=cfg)
        kls[alpha] = r.kl
        print(f"ITI {heads.name} alpha={alpha}: MC1={r.mc1:.3f} MC2={r.mc2:.3f} CE={r.ce:.3f} KL={r.kl:.4f}")
    assert 0 < kls[5.0] < kls[15.0]
    again = evaluate_edit(smollm2, None, data, "test", ("kl",), config=cfg)
    assert again.kl == 0.0
