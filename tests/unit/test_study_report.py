"""The report from a partial and a complete ledger (fake trial function, synthetic metrics)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from locaudit.study.analysis import comparisons, results_frame, singles_table, verdict
from locaudit.study.ledger import Ledger
from locaudit.study.report import build_report
from locaudit.study.runner import run_study
from locaudit.study.spec import parse_study

STUDY = {
    "name": "synthetic",
    "model": {"name": "tiny:llama"},
    "data": {"spec": "pairs:pairs.jsonl"},
    "localizers": {"probe": {"top_k": 4}, "random": {"n": 8}, "single": {"n": 6}},
    "iti": {"alphas": [2.0, 8.0]},
    "optimal": {"taus": [0.1, 0.3]},
    "evaluation": {"judge": "fake"},
}


def paper_like(trials, spec, run_dir):
    """Synthetic metrics shaped like the paper's finding: ITI favours the top-K heads, optimal edits do not."""
    for t in trials:
        rng = np.random.default_rng(int(hashlib.sha256(t.key.encode()).hexdigest()[:8], 16))
        if t.kind in ("collect", "probe"):
            yield t.key, {"metrics": {}, "artifacts": {}}
            continue
        g = t.group
        if t.kind == "baseline":
            true = 0.40
        elif t.kind == "iti":
            true = 0.40 + (0.30 if g == "top" else 0.02) + 0.02 * rng.normal()
        else:
            true = 0.80 + (0.05 if g == "all" else 0.0) + 0.03 * rng.normal()
        info = 0.9 - 0.05 * rng.random()
        yield t.key, {"metrics": {"true": true, "info": info, "true_info": true * info, "mc1": 0.3 + 0.05 * rng.random(),
                                  "mc2": 0.5 + 0.05 * rng.random(), "kl": 0.0 if t.kind == "baseline" else 0.2 * rng.random(),
                                  "ce": 2.5 + 0.1 * rng.random()},
                      "artifacts": {"heads": f"L{rng.integers(3)}H{rng.integers(4)}" if g == "single" else None}}


@pytest.fixture
def spec(tmp_path: Path):
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    return parse_study(STUDY, tmp_path, "synthetic.yaml")


def test_report_from_partial_ledger(tmp_path: Path, spec) -> None:
    run = tmp_path / "run"
    with Ledger(run, writer=True) as led:  # nothing run yet: only the spec
        led.set_meta("spec", spec.to_json())
    rep = build_report(run)
    assert "No evaluated trials yet" in rep.verdict["headline"] and rep.index.exists()
    run_study(spec, run, fn=paper_like, max_trials=12, progress=False)  # collect, probe, baseline, some ITI
    rep = build_report(run, n_resamples=999)
    html = rep.index.read_text()
    assert "Partial report" in html and "Verdict pending" in rep.verdict["headline"]
    assert rep.verdict["counts"]["done"] == 12 and rep.verdict["counts"]["pending"] > 0
    for name in ("trials.csv", "trials.parquet", "results.csv", "comparisons.csv", "singles.csv", "verdict.json"):
        assert (rep.out_dir / name).exists(), name
    assert len(pd.read_parquet(rep.out_dir / "trials.parquet")) == len(pd.read_csv(rep.out_dir / "trials.csv"))
    # a failed trial shows up with its error
    with Ledger(run, writer=True) as led:
        key = led.rows(status="pending")[0]["key"]
        led.mark_running([key])
        led.finish(key, "failed", error="Traceback ...\nRuntimeError: out of memory")
    html = build_report(run, n_resamples=999).index.read_text()
    assert "Failed trials" in html and "RuntimeError: out of memory" in html


def test_report_complete_study(tmp_path: Path, spec) -> None:
    run = tmp_path / "run"
    s = run_study(spec, run, fn=paper_like, progress=False)
    assert s.failed == 0
    rep = build_report(run, n_resamples=999)
    v = rep.verdict
    assert v["primary_metric"] == "true_info"
    rows = {r["method"]: r for r in v["table"]}
    # ITI beats all 8 draws, but 8 draws cannot reach 0.05 by rank (floor 1/9): inconclusive, never "special"
    assert rows["iti"]["percentile"] == 100 and rows["iti"]["p_rank"] == pytest.approx(1 / 9)
    assert rows["iti"]["outcome"] == "inconclusive" and not rows["iti"]["in_family"]
    assert any(x.startswith("ITI (heuristic edit): inconclusive") and "at least 19 draws" in x for x in v["lines"])
    # optimal: the top-K heads sit among the draws; never evidence for, and the headline names the outcome
    assert rows["optimal"]["outcome"] in ("evidence against", "inconclusive") and rows["optimal"]["n_random"] == 8
    assert v["headline"].startswith("Edit-based evidence for localization: " + {"evidence against": "none",
                                    "inconclusive": "inconclusive"}[rows["optimal"]["outcome"]])
    assert rows["optimal"]["n_single"] == 6 and rows["optimal"]["selection"] == "optimistic"
    assert v["outcome"] == rows["optimal"]["outcome"]
    for fig in ("hist_iti", "hist_optimal", "truth_info", "kl_mc", "single_vs_full_optimal", "grid_iti", "grid_optimal"):
        assert fig in rep.figures and rep.figures[fig].stat().st_size > 5000, fig
    html = rep.index.read_text()
    assert html.count("data:image/png;base64,") == len(rep.figures)
    assert "Partial report" not in html
    comp = pd.read_csv(rep.out_dir / "comparisons.csv")
    assert {"selected", "best_on_test", "alpha=2", "alpha=8", "pooled"} <= set(comp[comp["method"] == "iti"]["scope"])

    def no_nan(x):
        raise AssertionError(f"non-standard JSON constant {x}")

    for name in ("verdict.json",):  # strict JSON: NaN / Infinity would fail JSON.parse
        text = (rep.out_dir / name).read_text()
        assert json.loads(text, parse_constant=no_nan)["headline"] == v["headline"]
    assert "null" in (rep.out_dir / "verdict.json").read_text()  # NaN numbers (e.g. welch_seeds_p) became null


@pytest.mark.parametrize("primary", [None, "mc2"])
def test_the_histograms_and_grid_curves_show_the_verdicts_metric(tmp_path: Path, primary, monkeypatch) -> None:
    """The figures of the headline comparison plot the metric the verdict rests on: the study's
    verdict.primary_metric where it names one (MC2 here), not the first of the frame's metrics (True*Info)."""
    import locaudit.study.figures as F

    (tmp_path / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    study = {**STUDY, "verdict": {"primary_metric": primary}} if primary else STUDY
    spec = parse_study(study, tmp_path, "s.yaml")
    run = tmp_path / "run"
    run_study(spec, run, fn=paper_like, progress=False)
    seen: dict[str, list] = {"hist": [], "grid": []}
    for name, fig in (("hist", "hist_random_vs_top"), ("grid", "grid_curves")):
        real = getattr(F, fig)

        def spy(*a, _real=real, _name=name, **k):
            seen[_name].append(k.get("metric"))
            return _real(*a, **k)

        monkeypatch.setattr(F, fig, spy)
    rep = build_report(run, n_resamples=99)
    want = primary or "true_info"
    assert rep.verdict["primary_metric"] == want
    assert seen["hist"] == [want, want] and seen["grid"] == [want, want]  # ITI and optimal
    assert "hist_optimal" in rep.figures and "grid_optimal" in rep.figures


def test_best_grid_point_selection(tmp_path: Path, spec) -> None:
    run = tmp_path / "run"
    run_study(spec, run, fn=paper_like, progress=False)
    with Ledger(run) as led:
        res = results_frame(led.rows())
    comp = comparisons(res, n_resamples=199)
    # the optimistic view (labelled so): grid points chosen on the reported test values themselves
    best = comp[(comp["method"] == "iti") & (comp["metric"] == "true_info") & (comp["scope"] == "best_on_test")].iloc[0]
    iti = res[res["kind"] == "iti"]
    top_best = iti[iti["group"] == "top"]["true_info"].max()
    rand_best = iti[iti["group"] == "random"].groupby("localizer")["true_info"].max()
    assert best["candidate_mean"] == pytest.approx(top_best) and best["selection"] == "optimistic"
    assert best["random_mean"] == pytest.approx(rand_best.mean())
    assert best["n_random"] == 8
    sel = comp[(comp["method"] == "iti") & (comp["metric"] == "true_info") & (comp["scope"] == "selected")].iloc[0]
    # no validation results and no per-question scores in this fake ledger: the selection says it is optimistic
    assert sel["selection"] == "optimistic" and sel["optimistic_candidate"] == pytest.approx(top_best)
    singles = singles_table(res)
    assert len(singles[singles["method"] == "optimal"]) == 6
    v = verdict(res, comp, singles, top_k=4)
    assert any("single heads" in x for x in v.lines)


def underpowered(trials, spec, run_dir):
    """The top-K heads beat all 8 random draws under the optimal edit, which spread too widely for a t-test."""
    for t in trials:
        if t.kind in ("collect", "probe", "judge"):
            yield t.key, {"metrics": {}, "artifacts": {}}
            continue
        loc = t.localizer
        if t.kind == "baseline":
            true = 0.40
        elif t.kind == "iti":
            true = 0.45
        elif loc.kind == "random":
            true = 0.60 + 0.05 * loc.seed  # 0.60 .. 0.95
        else:
            true = {"top": 0.96, "all": 0.97}.get(loc.kind, 0.5)
        yield t.key, {"metrics": {"true": true, "mc1": 0.3, "kl": 0.1}, "artifacts": {}}


def test_verdict_says_when_random_draws_are_too_few(tmp_path: Path, spec) -> None:
    run = tmp_path / "run"
    run_study(spec, run, fn=underpowered, progress=False)
    with Ledger(run) as led:
        res = results_frame(led.rows())
    comp = comparisons(res, n_resamples=199)
    v = verdict(res, comp, singles_table(res), top_k=4)
    row = {r["method"]: r for r in v.table}["optimal"]
    assert row["percentile"] == 100 and row["p_rank"] > 0.05 and row["outcome"] == "inconclusive"
    assert v.headline.startswith("Edit-based evidence for localization: inconclusive")
    assert "at least 19 draws to reach 0.05" in v.headline
    # with the same spread but the candidate inside it, still not "none": nothing shows equivalence either
    res.loc[(res["kind"] == "optimal") & (res["group"] == "top"), "true"] = 0.70
    v = verdict(res, comparisons(res, n_resamples=199), singles_table(res), top_k=4)
    assert v.headline.startswith("Edit-based evidence for localization: inconclusive")
    # ITI moves every location to the same 0.45: the top-K are not better, and the flat draws make them equivalent
    assert {r["method"]: r for r in v.table}["iti"]["outcome"] == "evidence against"


def test_cli_report_and_dry_run(tmp_path: Path, spec) -> None:
    from typer.testing import CliRunner

    from locaudit.cli.main import app

    run = tmp_path / "run"
    run_study(spec, run, fn=paper_like, max_trials=8, progress=False)
    res = CliRunner().invoke(app, ["report", str(run), "--resamples", "199"])
    assert res.exit_code == 0, res.output
    assert "8 done" in res.output and (run / "report" / "index.html").exists()
    study = tmp_path / "s.yaml"
    import yaml

    study.write_text(yaml.safe_dump(STUDY))
    res = CliRunner().invoke(app, ["run", str(study), "--out", str(run), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert res.output.count(" done ") == 8 and "pending" in res.output
    assert "trials: 1 collect, 1 probe, 1 judge, 1 baseline, 18 iti, 32 optimal" in res.output
    assert "smallest p 0.111" in res.output and "WARNING: optimal: 8 random draws" in res.output
    res = CliRunner().invoke(app, ["run", str(study), "--out", str(run), "--only", "bogus"])
    assert res.exit_code != 0


def per_question(trials, spec, run_dir):
    """Writes judgements.jsonl per evaluation (20 questions), as the real steps do: the report pairs them."""
    qids = [f"q{i}" for i in range(20)]
    item = np.linspace(-0.2, 0.2, 20)  # question difficulty, shared by every edit
    for t in trials:
        if t.kind in ("collect", "probe", "judge"):
            yield t.key, {"metrics": {}, "artifacts": {}}
            continue
        rng = np.random.default_rng(int(hashlib.sha256(t.key.encode()).hexdigest()[:8], 16))
        level = {"baseline": 0.3, "iti": 0.35}.get(t.kind, 0.6 + (0.2 if t.group == "all" else 0.0))
        truth = np.clip(level + item + 0.05 * rng.standard_normal(20), 0, 1)
        d = Path(run_dir) / "trials" / t.key / "eval"
        d.mkdir(parents=True, exist_ok=True)
        (d / "judgements.jsonl").write_text("".join(json.dumps({"qid": q, "answer": "a", "truth": float(v), "info": None})
                                                    + "\n" for q, v in zip(qids, truth)))
        hard = (truth >= 0.5).astype(float)  # True: the probability thresholded at 0.5 (EvalResult.set_judged)
        yield t.key, {"metrics": {"true": float(hard.mean()), "true_se": float(hard.std(ddof=1) / np.sqrt(20)),
                                  "true_prob": float(truth.mean()), "judge_threshold": 0.5},
                      "artifacts": {"eval": f"trials/{t.key}/eval"}}


def test_report_pairs_questions_and_cross_fits(tmp_path: Path, spec) -> None:
    # the verdict on the judges' mean probability of True: smooth per question, so equal edits look equal
    # (thresholded True flips questions near 0.5 between equal edits; the next test checks that one)
    # (20 questions: the t-calibrated TOST bounds of the optimal edit, about [-10%, 4%] of the gain, need a
    # margin a little wider than the default 10%)
    spec = spec.model_copy(update={"verdict": spec.verdict.model_copy(update={"primary_metric": "true_prob",
                                                                              "margin": 0.15})})
    run = tmp_path / "run"
    run_study(spec, run, fn=per_question, progress=False)
    rep = build_report(run, n_resamples=499)
    comp = pd.read_csv(rep.out_dir / "comparisons.csv", dtype={"metric": str})  # else pandas reads "true" as True
    sel = comp[(comp["scope"] == "selected") & (comp["metric"] == "true_prob")].set_index("method")
    assert set(sel["question_noise"]) == {"paired per-question bootstrap"}
    assert set(sel["selection"]) == {"cross-fit"}  # two grid points, no validation results: halves of the questions
    assert (sel["n_questions"] == 20).all()
    v = rep.verdict
    assert v["selection"] == {"iti": "cross-fit", "optimal": "cross-fit"}
    # every optimal edit but full alignment sits at the same level: equivalence within 15% of the gain
    assert {r["method"]: r["outcome"] for r in v["table"]}["optimal"] == "evidence against"
    assert v["headline"].startswith("Edit-based evidence for localization: none")
    for name in ("verdict.csv", "selected.csv", "flags.csv", "singles.csv"):
        assert (rep.out_dir / name).exists(), name
    selected = pd.read_csv(rep.out_dir / "selected.csv")
    assert len(selected[(selected["method"] == "optimal") & (selected["group"] == "random")]) == 8
    # judgements.jsonl holds probabilities: the per-question True is them thresholded at the trial's
    # judge_threshold, so the analysis reproduces each trial's recorded True (and true_prob stays soft)
    from locaudit.study.analysis import load_per_question

    with Ledger(run) as led:
        rows = led.rows()
    perq = load_per_question(run, rows)
    checked = 0
    for r in rows:
        if r["key"] in perq and "true" in (r.get("metrics") or {}):
            comps = perq[r["key"]]
            assert set(comps["true"].values()) <= {0.0, 1.0}
            assert np.mean(list(comps["true"].values())) == pytest.approx(r["metrics"]["true"])
            assert np.mean(list(comps["true_prob"].values())) == pytest.approx(r["metrics"]["true_prob"])
            checked += 1
    assert checked > 10


def test_histogram_marks_each_candidate_at_its_own_value(tmp_path: Path, monkeypatch) -> None:
    """With several candidate localizers (probe, patching), each gets its own line at its own value; the
    figure never draws their mean as "probe top-K"."""
    import pandas as pd

    from locaudit.study import figures as F

    rows = [{"kind": "optimal", "group": "random", "localizer": f"random2@{i}", "seed": 0, "mc2": 0.30 + 0.01 * i}
            for i in range(6)]
    rows += [{"kind": "optimal", "group": "top", "localizer": "top2", "seed": 0, "mc2": 0.50},
             {"kind": "optimal", "group": "top", "localizer": "patching:top2", "seed": 0, "mc2": 0.20},
             {"kind": "optimal", "group": "all", "localizer": "all", "seed": 0, "mc2": 0.60}]
    seen = {}

    def keep(fig, path, dpi=120):
        seen["lines"] = {ln.get_label(): float(ln.get_xdata()[0]) for ln in fig.axes[0].get_lines()}
        return Path(path)

    monkeypatch.setattr(F, "save_figure", keep)
    F.hist_random_vs_top(pd.DataFrame(rows), "optimal", tmp_path / "h.png", metric="mc2", top_k=2)
    lines = seen["lines"]
    assert lines["probe top-2 (0.500)"] == pytest.approx(0.5)
    assert lines["patching top-2 (0.200)"] == pytest.approx(0.2)
    assert not any(abs(v - 0.35) < 1e-9 for v in lines.values())  # not the two candidates' mean
