"""scripts/results_doc.py: docs/results.md generated from report folders, never typed.

A real (fake-metric) study's report gives the page: its numbers are verdict.csv's, its figures are copied, the
plain words follow the outcome, `--check` fails on an edited figure and passes on the generated page; the judge
agreement is scipy's Spearman correlation."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("results_doc", ROOT / "scripts" / "results_doc.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["results_doc"] = mod  # its dataclass looks its module up
    spec.loader.exec_module(mod)
    return mod


rd = _load()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A three-candidate study with fake metrics (tests/unit/test_study_candidates.py) and its report."""
    from test_study_candidates import STUDY, fake

    from locaudit.study.report import build_report
    from locaudit.study.runner import run_study
    from locaudit.study.spec import parse_study

    root = tmp_path_factory.mktemp("rd")
    (root / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    spec = parse_study({**STUDY, "precision": "fp32", "localizers": {**STUDY["localizers"], "random": {"n": 19, "max_overlap": None},
                                          "single": {"n": 3, "seed": 0}}}, root, "s.yaml")
    run_study(spec, root / "run", fn=fake, progress=False)
    build_report(root / "run", n_resamples=199)
    return root / "run"


def test_the_page_carries_the_reports_numbers_and_figures(run, tmp_path) -> None:
    out = tmp_path / "docs" / "results.md"
    assert rd.main(["--study", f"Tiny model={run}", "--out", str(out)]) == 0
    text = out.read_text()
    v = pd.read_csv(run / "report" / "verdict.csv")
    opt = v[v["method"] == "optimal"].iloc[0]
    row = next(line for line in text.splitlines() if line.startswith("| optimal |"))
    assert f"**{opt['outcome']}**" in row and f"{opt['candidate_mean']:.3f}" in row
    assert f"{opt['random_mean']:.3f} ± {opt['random_sd']:.3f} ({int(opt['n_random'])})" in row
    assert "In plain words: On mc2" in text and opt["outcome"] in text
    figs = [p.name for p in (tmp_path / "docs" / "results" / "tiny-model").iterdir()]
    assert "hist_optimal.png" in figs
    assert "](results/tiny-model/hist_optimal.png)" in text
    assert rd.main(["--study", f"Tiny model={run}", "--out", str(out), "--check"]) == 0
    out.write_text(text.replace(f"{opt['candidate_mean']:.3f}", "0.999", 1))  # a typed figure
    assert rd.main(["--study", f"Tiny model={run}", "--out", str(out), "--check"]) == 1


@pytest.mark.parametrize("outcome, words", [("evidence for", "against the paper's general claim"),
                                            ("evidence against", "as the paper argues"),
                                            ("suggestive", "not a decision either way"),
                                            ("inconclusive", "absence of a difference is not equivalence")])
def test_plain_words_follow_the_outcome(outcome: str, words: str) -> None:
    st = rd.Study("m", Path("."), {}, pd.DataFrame([{"method": "optimal", "metric": "mc2", "outcome": outcome}]),
                  singles=None, timing=None, results=None)
    assert words in rd.plain_words(st) and outcome in rd.plain_words(st)
    others = [w for o, w in [("evidence for", "against the paper's general claim"), ("evidence against", "as the paper argues")]
              if o != outcome]
    assert not any(w in rd.plain_words(st) for w in others)


def test_judge_agreement_is_spearman_over_the_same_edits() -> None:
    rng = np.random.default_rng(0)
    keys = [f"k{i}" for i in range(12)]
    a = rng.uniform(0, 1, 12)
    b = a + rng.normal(0, 0.2, 12)
    sa = rd.Study("m", Path("."), {}, pd.DataFrame(), singles=None, timing=None,
                  results=pd.DataFrame({"key": keys, "true_info": a}))
    sb = rd.Study("m", Path("."), {}, pd.DataFrame(), singles=None, timing=None,
                  results=pd.DataFrame({"key": keys[::-1] + ["extra"], "true_info": list(b[::-1]) + [0.5]}))
    line = rd.judge_agreement(sa, sb)
    rho = sps.spearmanr(a, b).statistic
    assert "Over 12 edits" in line and f"Spearman correlation {rho:.2f}" in line
    assert f"{np.mean(np.abs(a - b) < 0.05):.0%} differ by under 0.05" in line


def test_a_missing_report_is_named(tmp_path) -> None:
    with pytest.raises(SystemExit, match="verdict.json not found"):
        rd.main(["--study", f"x={tmp_path}", "--out", str(tmp_path / "r.md")])
    with pytest.raises(SystemExit, match="expected NAME=PATH"):
        rd.main(["--study", str(tmp_path), "--out", str(tmp_path / "r.md")])


def test_hase_plain_words_follow_the_verdicts() -> None:
    from results_doc_hase import overall

    def vd(outcome, hi):
        return {"problem": "p", "method": "m", "outcome": outcome, "diff_vs_best_fixed_ci": [hi - 0.1, hi]}

    text = overall({"verdicts": [vd("inconclusive", 0.05), vd("inconclusive", -0.01)]})
    assert text.startswith("Of 2 (problem, editor) pairs, 2 inconclusive.") and "either way" in text
    assert "In 1 of 2" in text and "tracing did worse than ignoring it" in text
    text = overall({"verdicts": [vd("evidence for", 0.2), vd("evidence against", 0.01)]})
    assert "1 evidence for, 1 evidence against" in text and "carries fact-level information" in text
    assert "either way" not in text and "did worse" not in text
    assert overall({"verdicts": []}) is None


def test_the_page_says_how_training_ended_where_the_report_does(run, tmp_path) -> None:
    import json
    import shutil

    out = tmp_path / "docs" / "results.md"
    assert rd.main(["--study", f"Tiny model={run}", "--out", str(out)]) == 0
    assert "### Training" not in out.read_text()  # the fake run trained nothing with early stopping
    rep = tmp_path / "run" / "report"
    shutil.copytree(run / "report", rep)
    v = json.loads((rep / "verdict.json").read_text())
    v["training"] = {"line": "Training ended by early stopping or by the step cap: probe top-K: 1 of 1 plateaued.",
                     "groups": []}
    (rep / "verdict.json").write_text(json.dumps(v))
    assert rd.main(["--study", f"Tiny model={rep.parent}", "--out", str(out)]) == 0
    text = out.read_text()
    assert "### Training\n\nTraining ended by early stopping or by the step cap: probe top-K: 1 of 1 plateaued." in text


def test_a_study_rendered_later_keeps_the_pages_other_sections(run, tmp_path) -> None:
    out = tmp_path / "docs" / "results.md"
    other = "## Does localization inform editing? (Hase et al. 2023) — Some model\n\nR² 0.123, typed by its own run.\n"
    out.parent.mkdir(parents=True)
    out.write_text(rd.HEADER + "\n" + other)
    assert rd.main(["--study", f"Tiny model={run}", "--out", str(out)]) == 0
    text = out.read_text()
    heads = [h for h, _ in rd.split_sections(text)]
    assert heads == [rd.STUDY_HEADING.format(name="Tiny model"), other.splitlines()[0]]  # the paper's question leads
    assert other in text and text.count("R² 0.123") == 1
    assert rd.main(["--study", f"Tiny model={run}", "--out", str(out), "--check"]) == 0
    # re-rendered in place (not appended again), and an edit to its own section is caught while the kept one is not
    assert rd.main(["--study", f"Tiny model={run}", "--out", str(out)]) == 0 and out.read_text() == text
    out.write_text(text.replace("R² 0.123", "R² 0.456"))
    assert rd.main(["--study", f"Tiny model={run}", "--out", str(out), "--check"]) == 0
    out.write_text(text.replace("| optimal |", "| optimal (typed) |", 1))
    assert rd.main(["--study", f"Tiny model={run}", "--out", str(out), "--check"]) == 1
    # --fresh: only the sections given
    assert rd.main(["--study", f"Tiny model={run}", "--out", str(out), "--fresh"]) == 0
    assert "R² 0.123" not in out.read_text() and len(rd.split_sections(out.read_text())) == 1


def test_the_committed_page_keeps_itself() -> None:
    page = ROOT / "docs" / "results.md"
    text = page.read_text(encoding="utf-8")
    assert text.startswith(rd.HEADER) and rd.merge(text, []) == text


def test_a_study_given_twice_gets_one_section_the_last() -> None:
    twice = [("## A", "## A\n\nfirst\n"), ("## A", "## A\n\nsecond\n")]
    assert rd.merge(None, twice) == rd.HEADER + "\n## A\n\nsecond\n"
    kept = rd.merge(None, [("## A", "## A\n\nold\n"), ("## B", "## B\n\nb\n")])
    assert rd.merge(kept, twice) == rd.HEADER + "\n## A\n\nsecond\n\n## B\n\nb\n"


def test_the_papers_question_leads_the_page_each_kind_in_its_order() -> None:
    wv = [rd.STUDY_HEADING.format(name=n) for n in ("M1", "M2", "M3")]
    page = rd.merge(None, [("## Hase 1", "## Hase 1\n"), (wv[1], wv[1] + "\n"), ("## Hase 2", "## Hase 2\n"),
                           (wv[0], wv[0] + "\n")])
    assert [h for h, _ in rd.split_sections(page)] == [wv[1], wv[0], "## Hase 1", "## Hase 2"]
    later = rd.merge(page, [(wv[2], wv[2] + "\n"), (wv[0], wv[0] + "\nnew\n")])  # replaced in place, new after
    assert [h for h, _ in rd.split_sections(later)] == [wv[1], wv[0], wv[2], "## Hase 1", "## Hase 2"]
    assert "new" in later and rd.merge(later, []) == later


@pytest.fixture(scope="module")
def dry_run_json(tmp_path_factory) -> Path:
    """`locaudit run STUDY --dry-run --measure --json` on the tiny study of test_cost_probe.py, as a file."""
    import json

    from test_cost_probe import _spec
    from typer.testing import CliRunner

    from locaudit.cli.main import app

    root = tmp_path_factory.mktemp("planned")
    study = _spec(root)
    res = CliRunner().invoke(app, ["run", str(study), "--out", str(root / "run"), "--dry-run", "--measure", "--json"])
    assert res.exit_code == 0, res.output
    # the JSON keeps the line that runs what it checked (without --dry-run)
    assert json.loads(res.stdout)["command"] == f"locaudit run {study.as_posix()} --out {(root / 'run').as_posix()}"
    path = root / "dryrun.json"
    path.write_text(res.stdout)
    return path


@pytest.mark.usefixtures("one_thread")
def test_a_planned_study_shows_its_design_and_measured_cost_until_its_run_replaces_it(run, dry_run_json,
                                                                                     tmp_path) -> None:
    import json

    from locaudit.study.cost_probe import measure_text

    d = json.loads(dry_run_json.read_text())
    out = tmp_path / "docs" / "results.md"
    assert rd.main(["--planned", f"Tiny model={dry_run_json}", "--out", str(out)]) == 0
    text = out.read_text()
    heading = rd.STUDY_HEADING.format(name="Tiny model")
    assert [h for h, _ in rd.split_sections(text)] == [heading]
    n = sum(d["counts"].values())
    assert d["counts"]["optimal"] == 7 and n == len(d["trials"])
    assert (f"**Not run yet.** Study `tiny-measure`: {n} trials ("
            + ", ".join(f"{k} {kind}" for kind, k in d["counts"].items()) + f"); {n} new.") in text
    assert "Design (alpha 0.05" in text and "assumed" in text  # no pilot: the study's assumed spread, said so
    for line in measure_text(d["design"]["measured_cost"]):  # the measurement's own lines, with where it was made
        assert line.strip() in text
    assert f"{d['design']['measured_cost']['measured']['machine']['cpu_capability']}, fp32, 1 thread(s)" in text
    assert f"```bash\n{d['command']}\n" in text
    # the finished study of the same name replaces the plan in place; both at once is refused
    assert rd.main(["--study", f"Tiny model={run}", "--out", str(out)]) == 0
    text = out.read_text()
    assert [h for h, _ in rd.split_sections(text)] == [heading] and "Not run yet" not in text
    with pytest.raises(SystemExit, match="also given as --study"):
        rd.main(["--study", f"Tiny model={run}", "--planned", f"Tiny model={dry_run_json}", "--out", str(out)])


def test_a_planned_study_without_a_measurement_is_named(dry_run_json, tmp_path) -> None:
    import json

    d = json.loads(dry_run_json.read_text())
    del d["design"]["measured_cost"]
    bad = tmp_path / "plain.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(SystemExit, match=r"plain.json: missing design.measured_cost \(run the dry-run with --measure\)"):
        rd.main(["--planned", f"x={bad}", "--out", str(tmp_path / "r.md")])
    with pytest.raises(SystemExit, match="no such file"):
        rd.main(["--planned", f"x={tmp_path / 'none.json'}", "--out", str(tmp_path / "r.md")])


def test_the_committed_pages_planned_studies_are_their_dry_runs(monkeypatch) -> None:
    """A "Not run yet" section of docs/results.md is what its committed dry-run JSON renders, nothing typed."""
    import re

    monkeypatch.chdir(ROOT)
    text = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    planned = [(h, re.search(r"From `([^`]+\.json)`", b)) for h, b in rd.split_sections(text) if "**Not run yet.**" in b]
    for heading, src in planned:
        assert src, f"{heading}: a planned section names the dry-run it renders"
        name = heading.split(" — ", 1)[1]
        assert rd.main(["--planned", f"{name}={src.group(1)}", "--out", "docs/results.md", "--check"]) == 0, heading


def test_secondary_metrics_and_another_judges_comparisons_are_shown(run, tmp_path) -> None:
    """The secondary metrics' comparisons (comparisons.csv: selected grid point, secondary family) follow the
    headline; a re-judged report's judged metrics come from its comparisons.csv, not from its headline table."""
    import shutil

    out = tmp_path / "docs" / "results.md"
    c = pd.read_csv(run / "report" / "comparisons.csv")
    mc1 = c[(c["method"] == "optimal") & (c["metric"] == "mc1") & (c["scope"] == "selected")
            & (c["family"] == "secondary")].iloc[0]
    assert rd.main(["--study", f"Tiny model={run}", "--out", str(out)]) == 0
    text = out.read_text()
    assert "Secondary metrics (their own family" in text
    row = next(line for line in text.splitlines() if line.startswith("| optimal | mc1 |"))
    assert f"**{mc1['outcome']}**" in row and f"| {mc1['candidate_mean']:.3f} |" in row
    assert sum(line.startswith("| optimal | mc1 |") for line in text.splitlines()) == 1  # not its descriptive rows
    judged = tmp_path / "report-judge"
    shutil.copytree(run / "report", judged)
    ti = mc1.copy()
    ti["metric"], ti["candidate_mean"], ti["outcome"] = "true_info", 0.777, "evidence against"
    pd.concat([c, ti.to_frame().T]).to_csv(judged / "comparisons.csv", index=False)
    assert rd.main(["--study", f"Tiny model={run}", "--judge", f"Tiny model={judged}", "--out", str(out)]) == 0
    text = out.read_text()
    other = text.split("### Under another judge", 1)[1]
    assert "| optimal | true_info | **evidence against** | 0.777 |" in other
    assert "| optimal | mc1 |" not in other  # only the judged metrics change with the judge
    assert "true_info" not in text.split("### Under another judge", 1)[0]  # the study's own judge scored none
    (judged / "comparisons.csv").write_text(c[c["metric"] != "true_info"].to_csv(index=False))
    assert rd.main(["--study", f"Tiny model={run}", "--judge", f"Tiny model={judged}", "--out", str(out)]) == 0
    assert "_No judged comparison in this report._" in out.read_text()


def test_matched_kl_is_one_row_of_the_decision(run, tmp_path) -> None:
    import json
    import shutil

    rep = tmp_path / "run" / "report"
    shutil.copytree(run / "report", rep)
    out = tmp_path / "docs" / "results.md"
    assert rd.main(["--study", f"Tiny model={rep.parent}", "--out", str(out)]) == 0
    assert "### Matched collateral damage" not in out.read_text()  # the fake run has no dose curves
    v = json.loads((rep / "verdict.json").read_text())
    v["matched_kl"] = {"budget": 0.478, "budget_source": "0.5 x full alignment's KL (0.9561)", "metric": "mc2",
                       "candidate_gain": 0.267, "candidate_reached": False, "random_mean_gain": 0.237,
                       "random_sd_gain": 0.0403, "random_reached": 12, "n_random": 39, "diff": 0.0296,
                       "ci_low": 0.0004, "ci_high": 0.0587, "p_rank": 0.225, "p_mean": 0.0234, "full_gain": 0.228,
                       "tost_p": 0.675, "outcome": "inconclusive",
                       "locations": [{"localizer": f"random16@{i}", "gain": 0.2} for i in range(39)]}
    (rep / "verdict.json").write_text(json.dumps(v))
    assert rd.main(["--study", f"Tiny model={rep.parent}", "--out", str(out)]) == 0
    section = out.read_text().split("### Matched collateral damage", 1)[1].split("###", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| **")]
    assert rows == ["| **inconclusive** | 0.478 (0.5 x full alignment's KL (0.9561)) | 0.267 (not reached) | "
                    "0.237 ± 0.040 (12 of 39 reached) | 0.030 [0.0004, 0.059] | 0.225 | 0.023 | 0.228 | 0.675 |"]
    assert "random16@" not in section  # every location's gain stays in the report


def test_the_cost_line_says_what_interrupted_attempts_ran() -> None:
    def line(**total):
        t = pd.DataFrame([{"kind": "optimal", "trials": 2, "wall_s": 7200.0, "mean_wall_s": 3600.0},
                          {"kind": "total", "trials": 2, "wall_s": 7200.0, "mean_wall_s": None, **total}])
        return rd.cost_line(rd.Study("m", Path("."), {}, pd.DataFrame(), singles=None, timing=t, results=None))

    assert line(cpu_s=3600.0, earlier_attempts_s=0.0, unknown_attempts=0) == (
        "2 trials, 2.00 h of trial wall time (1.00 CPU-h): optimal 2 x 60.0 min.")
    assert line(cpu_s=3600.0, earlier_attempts_s=5400.0, unknown_attempts=0) == (
        "2 trials, 2.00 h of trial wall time, 1.50 h of it in earlier attempts that were interrupted; 1.00 CPU-h in "
        "the attempts that finished: optimal 2 x 60.0 min.")
    assert "(and 1 more of unknown length: a lower bound)" in line(cpu_s=3600.0, earlier_attempts_s=0.0,
                                                                   unknown_attempts=1)
    assert "(n/a CPU-h)" in line()  # a ledger without CPU times
