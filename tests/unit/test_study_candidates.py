"""Several candidate localizers in one study (probe, activation patching, attribution patching): trials,
each candidate's verdict against the same random draws, the correction across localizers, and agreement."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from locaudit.errors import ConfigError
from locaudit.localize.effects import HeadEffects
from locaudit.localize.stability import record_stability, topk_stability
from locaudit.study.analysis import analyze, candidates, for_candidate, results_frame
from locaudit.study.ledger import Ledger
from locaudit.study.report import build_report
from locaudit.study.runner import run_study
from locaudit.study.spec import parse_study
from locaudit.study.trials import expand

STUDY = {
    "name": "candidates",
    "model": {"name": "tiny:llama"},
    "data": {"spec": "pairs:pairs.jsonl"},
    "localizers": {"probe": {"top_k": 4}, "random": {"n": 49, "max_overlap": None}, "single": {"n": 0},
                   "patching": {"top_k": 3, "corruption": "noise", "max_pairs": 8},
                   "attribution": {"top_k": 3}},
    "iti": {"alphas": [2.0], "localizers": ["top", "random"]},
    "optimal": {"taus": [0.1], "localizers": ["top", "random", "all"]},
    "evaluation": {"metrics": ["mc"]},
    "verdict": {"primary_metric": "mc2"},
}


def fake(trials, spec, run_dir):
    """Optimal edits at activation patching's top-K are special; at the probe's and attribution's, not."""
    for t in trials:
        rng = np.random.default_rng(int(hashlib.sha256(t.key.encode()).hexdigest()[:8], 16))
        if t.kind == "localize":
            out = Path(run_dir) / "shared" / f"localize-{t.key}"
            g = torch.Generator().manual_seed(0 if t.content["method"] == "patching" else 1)
            meta = {}
            if t.content["method"] == "patching":  # patching's result carries its split-half stability
                record_stability(meta, torch.randn(8, 3, 4, generator=torch.Generator().manual_seed(2)), 3, "abs", 0)
            HeadEffects(torch.randn(3, 4, generator=g), torch.full((3, 4), 0.1), 8, t.content["method"],
                        meta=meta).save(out)
            yield t.key, {"metrics": {"n_pairs": 8.0}, "artifacts": {"localize": str(out.relative_to(run_dir))}}
            continue
        if t.kind in ("collect", "probe"):
            yield t.key, {"metrics": {}, "artifacts": {}}
            continue
        loc = t.content.get("localizer") or {}
        boost = 0.3 if t.kind == "optimal" and loc.get("ranking") == "patching" else 0.0
        base = {"baseline": 0.3, "iti": 0.4, "optimal": 0.6}[t.kind] + (0.1 if t.group == "all" else 0.0)
        yield t.key, {"metrics": {"mc2": base + boost + 0.01 * rng.normal(), "mc1": 0.2 + 0.01 * rng.random()},
                      "artifacts": {}}


@pytest.fixture
def spec(tmp_path: Path):
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    return parse_study(STUDY, tmp_path, "candidates.yaml")


def test_causal_localizers_add_candidates_with_their_own_rankings(spec) -> None:
    trials = expand(spec)
    loc = {t.content["method"]: t for t in trials if t.kind == "localize"}
    assert set(loc) == {"patching", "attribution"}
    from locaudit.localize.corruptions import PatchingConfig

    # the whole resolved config: the study's options over the defaults
    assert loc["patching"].content["config"] == PatchingConfig(corruption="noise", format="plain", max_pairs=8,
                                                                top_k=3).model_dump(mode="json")
    tops = [t for t in trials if t.kind == "optimal" and t.group == "top"]
    by_rank = {t.content["localizer"].get("ranking", "probe"): t for t in tops}
    assert set(by_rank) == {"probe", "patching", "attribution"}
    assert by_rank["patching"].content["ranking_trial"] == loc["patching"].key
    assert loc["patching"].key in by_rank["patching"].deps and by_rank["patching"].localizer.name == "patching:top3"
    assert "ranking_trial" not in by_rank["probe"].content  # the probe's candidate keeps its content (and key)
    iti_tops = [t for t in trials if t.kind == "iti" and t.group == "top"]
    assert len(iti_tops) == 3


def test_bad_localizer_option_is_named(tmp_path: Path) -> None:
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    bad = {**STUDY, "localizers": {**STUDY["localizers"], "patching": {"corruptionn": "noise"}}}
    with pytest.raises(ConfigError, match="corruptionn"):
        parse_study(bad, tmp_path, "bad.yaml")


def test_each_candidate_is_judged_against_the_same_draws(tmp_path: Path, spec) -> None:
    run = tmp_path / "run"
    s = run_study(spec, run, fn=fake, progress=False)
    assert s.failed == 0
    with Ledger(run) as led:
        rows = led.rows()
    res = results_frame(rows)
    assert candidates(res) == ["probe", "attribution", "patching"]
    a_probe = analyze(res, None, spec.verdict, n_resamples=199, candidate="probe")
    a_patch = analyze(res, None, spec.verdict, n_resamples=199, candidate="patching")
    opt = lambda a: a.comparisons[(a.comparisons["method"] == "optimal") & (a.comparisons["scope"] == "selected")  # noqa: E731
                                  & (a.comparisons["metric"] == "mc2")].iloc[0]
    assert opt(a_patch)["candidate_mean"] == pytest.approx(0.9, abs=0.05)
    assert opt(a_probe)["candidate_mean"] == pytest.approx(0.6, abs=0.05)
    assert opt(a_patch)["random_mean"] == pytest.approx(opt(a_probe)["random_mean"])  # the same null
    assert int(opt(a_patch)["n_random"]) == 49
    # in its own family (ITI and the optimal edit, Holm) patching passes both tests, but at 49 draws only the floor
    # p = 0.02 gets under Holm's 0.025: suggestive; the probe's top-K sit among the draws
    assert opt(a_patch)["outcome"] == "suggestive" and opt(a_probe)["outcome"] not in ("evidence for", "suggestive")
    assert len(for_candidate(res, "patching")) == len(res) - 4  # the other two candidates' top rows (iti + optimal)

    rep = build_report(run, n_resamples=199)
    side = pd.read_csv(rep.out_dir / "localizers.csv")
    assert set(side["localizer"]) == {"probe", "patching", "attribution"}
    row = side[(side["localizer"] == "patching") & (side["method"] == "optimal")].iloc[0]
    # one family across localizers by gatekeeping: the probe (primary) fails, so the gate stays closed
    assert row["own_family_outcome"] == "suggestive" and row["outcome"] == "inconclusive"
    assert "gate stayed closed" in row["outcome_note"] and not side["primary_localizer"][side["localizer"] != "probe"].any()
    agree = pd.read_csv(rep.out_dir / "agreement.csv")
    assert list(agree[["a", "b"]].iloc[0]) == ["patching", "attribution"] or list(agree[["a", "b"]].iloc[0]) == ["attribution", "patching"]
    assert 0.0 <= agree["jaccard"].iloc[0] <= 1.0 and agree["k"].iloc[0] == 3
    v = json.loads((rep.out_dir / "verdict.json").read_text())
    assert set(v["localizers"]) == {"probe", "patching", "attribution"}
    assert v["localizers"]["patching"]["outcome"] == "inconclusive"
    assert v["localizers"]["patching"]["headline"].startswith("Across localizers: suggestive in its own family")
    assert "gatekeeping across 3 localizers" in v["localizers"]["probe"]["headline"]
    html = rep.index.read_text()
    assert "Localizers side by side" in html and "Agreement between localizers" in html
    # each causal localizer's top-K stability, in the report's localizers section and in verdict.json
    assert "Stability of the localizers' top-K" in html
    st = pd.read_csv(rep.out_dir / "localizer_stability.csv").set_index("localizer")
    want = topk_stability(torch.randn(8, 3, 4, generator=torch.Generator().manual_seed(2)), 3, "abs", 0)
    assert st.loc["patching", "overlap"] == pytest.approx(want["overlap"])
    assert st.loc["patching", "spearman"] == pytest.approx(want["spearman"])
    assert st.loc["patching", "k"] == 3 and st.loc["patching", "chance"] == pytest.approx(3 / 12)
    assert st.loc["patching", "top_all"] == " ".join(want["top_all"])
    assert "no stability" in st.loc["attribution", "note"] and "probe" not in st.index
    vs = {r["localizer"]: r for r in v["localizer_stability"]}
    assert vs["patching"]["jaccard"] == pytest.approx(want["jaccard"]) and "note" in vs["attribution"]


def test_top_k_comes_from_the_runs_spec(tmp_path: Path, spec) -> None:
    """A candidate's K is the run's StudySpec's (top_k_of), not a fixed fallback; without a spec, the K its trial
    recorded."""
    from locaudit.study.candidates import rankings_of_run

    out = tmp_path / "loc"
    HeadEffects(torch.randn(3, 4), torch.full((3, 4), 0.1), 8, "patching").save(out)
    rows = [{"kind": "localize", "status": "done", "artifacts": {"localize": "loc"},
             "spec": {"content": {"method": "patching", "config": {}}}},
            {"kind": "localize", "status": "done", "artifacts": {"localize": "loc"},
             "spec": {"content": {"method": "attribution", "config": {"top_k": 5}}}}]
    got = rankings_of_run(tmp_path, rows, study=spec)
    assert got["patching"]["top_k"] == 3 and got["attribution"]["top_k"] == 3  # the spec's, over the recorded 5
    assert rankings_of_run(tmp_path, rows)["attribution"]["top_k"] == 5
