"""Matched collateral damage (study/matched_kl.py): interpolation at a KL budget checked by hand, the decision rule
on synthetic dose curves in both directions, and the report's section from a run with dose curves."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from locaudit.study.matched_kl import DoseCurve, choose_budget, gain_at_kl, matched_kl


# ---------------------------------------------------------------------------------------------- interpolation
def test_gain_at_kl_by_hand() -> None:
    """Linear in sqrt(KL) between the two points around the budget."""
    kl, gain = [0.1, 0.3, 0.6], [0.05, 0.2, 0.3]
    g, hit = gain_at_kl(kl, gain, 0.2)  # between (0.1, 0.05) and (0.3, 0.2): w = (0.4472 - 0.3162) / (0.5477 - 0.3162)
    assert hit and g[0] == pytest.approx(0.05 + 0.56582 * 0.15, abs=1e-5)
    g, hit = gain_at_kl(kl, gain, 0.05)  # on the first segment, from the unedited model at (0, 0): w = sqrt(1/2)
    assert hit and g[0] == pytest.approx(0.70711 * 0.05, abs=1e-5)
    g, hit = gain_at_kl(kl, gain, 0.6)  # exactly the last point
    assert hit and g[0] == pytest.approx(0.3)
    g, hit = gain_at_kl(kl, gain, 1.0)  # never reached: the last point, flagged
    assert not hit and g[0] == pytest.approx(0.3)
    # a path whose KL is not monotone: the first segment that reaches the budget counts
    g, hit = gain_at_kl([0.2, 0.1, 0.5], [0.4, 0.1, 0.6], 0.15)
    assert hit and g[0] == pytest.approx(math.sqrt(0.15 / 0.2) * 0.4)
    # a scaled edit (gain = c * sqrt(KL)) is read off exactly, however coarse its points
    g, _ = gain_at_kl([0.5, 2.0], [0.3 * math.sqrt(0.5), 0.3 * math.sqrt(2.0)], 0.3)
    assert g[0] == pytest.approx(0.3 * math.sqrt(0.3))


def test_per_question_gains_interpolate_with_the_same_weights() -> None:
    kl = np.array([0.1, 0.4])
    gain = np.array([[0.0, 0.2, 0.4], [0.3, 0.5, 1.0]])  # [points, questions]
    g, hit = gain_at_kl(kl, gain, 0.3)
    w = (math.sqrt(0.3) - math.sqrt(0.1)) / (math.sqrt(0.4) - math.sqrt(0.1))
    assert hit and g == pytest.approx(gain[0] + w * (gain[1] - gain[0]))
    assert g.mean() == pytest.approx(gain_at_kl(kl, gain.mean(axis=1), 0.3)[0][0])  # mean of questions commutes


def test_budget_choice() -> None:
    c = [DoseCurve("all", "all", [0.2, 0.8], [0.1, 0.3]), DoseCurve("r0", "random", [0.1, 0.4], [0.1, 0.2]),
         DoseCurve("r1", "random", [0.1, 0.2], [0.1, 0.2])]
    assert choose_budget(c, 0.3, 0.5)[0] == 0.3
    assert choose_budget(c, None, 0.5)[0] == pytest.approx(0.4)  # half of full alignment's final KL
    assert choose_budget(c[1:], None, 0.5)[0] == pytest.approx(0.15)  # half the draws' median final KL


# ---------------------------------------------------------------------------------------------- the decision rule
N_Q = 40


def _curve(name: str, group: str, slope: float, final_kl: float, rng, item: np.ndarray) -> DoseCurve:
    """A training path at 4 points up to `final_kl`, gain = slope * sqrt(kl) (a growing edit) per question, with
    question noise."""
    kl = final_kl * np.array([0.25, 0.5, 0.75, 1.0])
    mean = slope * np.sqrt(kl)
    gain = mean[:, None] * (1 + item[None, :]) + 0.02 * rng.standard_normal((kl.size, N_Q))
    return DoseCurve(name, group, kl, gain)


def _study(seed: int, top_slope: float | None = None, top_kl: float | None = None, n_random: int = 39
           ) -> list[DoseCurve]:
    rng = np.random.default_rng(seed)
    item = np.linspace(-0.5, 0.5, N_Q)  # question difficulty, shared by every edit
    slopes = 0.3 + 0.03 * rng.standard_normal(n_random + 1)
    out = [_curve(f"r{i}", "random", slopes[i], 1.0 + 0.2 * rng.random(), rng, item) for i in range(n_random)]
    s = slopes[-1] if top_slope is None else top_slope  # None: the candidate is one more draw (the null)
    out.append(_curve("top", "top", s, 1.0 + 0.2 * rng.random() if top_kl is None else top_kl, rng, item))
    out.append(_curve("all", "all", 0.5, 1.5, rng, item))
    return out


def test_null_is_not_evidence_for() -> None:
    outcomes = [matched_kl(_study(seed), 0.5, n_resamples=299, seed=seed)["outcome"] for seed in range(20)]
    # the candidate is exchangeable with the draws: a false "evidence for" at most at about alpha
    assert outcomes.count("evidence for") + outcomes.count("suggestive") <= 2, outcomes


def test_more_gain_per_kl_is_evidence_for() -> None:
    for seed in range(5):
        r = matched_kl(_study(seed, top_slope=0.5), 0.5, n_resamples=299, seed=seed)
        assert r["outcome"] == "evidence for", r
        assert r["diff"] > 0 and r["ci_low"] > 0 and r["p_rank"] == pytest.approx(1 / 40)


def test_winning_by_more_damage_is_not_evidence_for() -> None:
    # the candidate's path has the draws' gain per KL (their mean slope) but goes three times as far
    for seed in range(5):
        curves = _study(seed, top_slope=0.3, top_kl=3.0)
        top = next(c for c in curves if c.group == "top")
        finals = [c.gain[-1].mean() for c in curves if c.group == "random"]
        assert top.gain[-1].mean() > max(finals)  # at its own end point it beats every draw ...
        r = matched_kl(curves, 0.5, n_resamples=299, seed=seed)
        assert r["candidate_reached"] and r["random_reached"] == 39
        assert r["outcome"] not in ("evidence for", "suggestive"), r  # ... at matched KL it does not
        assert abs(r["diff"]) < 0.02


def test_aggregate_only_curves_still_decide() -> None:
    curves = [DoseCurve(c.name, c.group, c.kl, c.gain.mean(axis=1)) for c in _study(0, top_slope=0.5)]
    r = matched_kl(curves, 0.5, n_resamples=0)
    assert r["n_questions"] is None and r["question_noise"].startswith("none")
    assert r["outcome"] == "evidence for"
    assert all(np.isnan(loc["ci_low"]) for loc in r["locations"])


def test_location_intervals_cover_questions() -> None:
    r = matched_kl(_study(1), 0.5, n_resamples=499, seed=1)
    for loc in r["locations"]:
        assert loc["ci_low"] < loc["gain"] < loc["ci_high"]
        assert loc["se"] > 0


# ---------------------------------------------------------------------------------------------- the report
def _dose_run(trials, spec, run_dir):
    """Fake trials writing per-question MC2 and dose.json as steps/optimal.py does: the top-K path has twice the
    draws' gain per KL."""
    qids = [f"q{i}" for i in range(16)]
    item = np.linspace(-0.1, 0.1, 16)

    def write(folder: Path, mc2: np.ndarray) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mc_items.jsonl").write_text("".join(json.dumps({"qid": q, "mc1": 0.0, "mc2": float(v)}) + "\n"
                                                       for q, v in zip(qids, mc2)))

    for t in trials:
        if t.kind in ("collect", "probe", "judge"):
            yield t.key, {"metrics": {}, "artifacts": {}}
            continue
        rng = np.random.default_rng(int(hashlib.sha256(t.key.encode()).hexdigest()[:8], 16))
        d = Path(run_dir) / "trials" / t.key
        base = 0.4 + item
        if t.kind == "baseline":
            write(d / "eval", base)
            yield t.key, {"metrics": {"mc2": float(base.mean()), "kl": 0.0}, "artifacts": {"eval": f"trials/{t.key}/eval"}}
            continue
        slope = {"top": 0.4, "all": 0.5}.get(t.group, 0.2 + 0.01 * rng.standard_normal())
        points = []
        for step, kl in ((1, 0.1), (2, 0.3), (4, 0.6)):
            mc2 = base + slope * kl + 0.01 * rng.standard_normal(16)
            sub = "eval" if step == 4 else f"dose/step-{step}"
            write(d / sub, mc2)
            points.append({"step": step, "final": step == 4, "eval": f"trials/{t.key}/{sub}",
                           "metrics": {"mc2": float(mc2.mean()), "kl": kl}})
        (d / "dose.json").write_text(json.dumps({"trial": t.key, "metrics": ["kl", "mc"], "points": points}))
        yield t.key, {"metrics": {"mc2": points[-1]["metrics"]["mc2"], "kl": 0.6, "n_dose_points": 3.0},
                      "artifacts": {"eval": f"trials/{t.key}/eval", "dose": f"trials/{t.key}/dose.json"}}


def test_report_shows_matched_kl(tmp_path: Path) -> None:
    from locaudit.study.report import build_report
    from locaudit.study.runner import run_study
    from locaudit.study.spec import parse_study

    (tmp_path / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    spec = parse_study({"name": "dose", "model": {"name": "tiny:llama"}, "data": {"spec": "pairs:pairs.jsonl"},
                        "localizers": {"probe": {"top_k": 4}, "random": {"n": 19}},
                        "iti": {"enabled": False}, "optimal": {"dose_steps": [1, 2], "localizers": ["top", "random", "all"]},
                        "evaluation": {"metrics": ["mc", "kl"]}, "verdict": {"primary_metric": "mc2"}},
                       tmp_path, "dose.yaml")
    run = tmp_path / "run"
    run_study(spec, run, fn=_dose_run, progress=False)
    rep = build_report(run, n_resamples=199)
    mk = rep.verdict["matched_kl"]
    assert mk["budget"] == pytest.approx(0.3)  # half of full alignment's KL
    assert mk["candidate_gain"] == pytest.approx(0.4 * 0.3, abs=0.01)
    assert mk["random_mean_gain"] == pytest.approx(0.2 * 0.3, abs=0.01)
    assert mk["outcome"] in ("evidence for", "suggestive")  # 19 draws: at the floor, suggestive at most
    assert any(line.startswith("Matched collateral damage") for line in rep.verdict["lines"])
    assert (rep.out_dir / "dose_kl.png").is_file() and (rep.out_dir / "matched_kl.csv").is_file()
    assert "Matched collateral damage" in rep.index.read_text()


def test_report_without_dose_curves_is_unchanged(tmp_path: Path) -> None:
    from locaudit.study.report import build_report
    from locaudit.study.runner import run_study
    from locaudit.study.spec import parse_study

    from test_study_report import STUDY, paper_like

    (tmp_path / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    run = tmp_path / "run"
    run_study(parse_study(STUDY, tmp_path, "s.yaml"), run, fn=paper_like, progress=False)
    rep = build_report(run, n_resamples=99)
    assert "matched_kl" not in rep.verdict
    assert not (rep.out_dir / "dose_kl.png").exists() and not (rep.out_dir / "learning_curves.png").exists()
    assert "Matched collateral damage" not in rep.index.read_text()


def test_trial_keys_unchanged_without_dose_steps(tmp_path: Path) -> None:
    from locaudit.study.spec import parse_study
    from locaudit.study.trials import expand

    from test_study_report import STUDY

    (tmp_path / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    plain = expand(parse_study(STUDY, tmp_path, "s.yaml"))
    assert all("dose_steps" not in t.content for t in plain)
    dosed = expand(parse_study({**STUDY, "optimal": {**STUDY["optimal"], "dose_steps": [0.5]}}, tmp_path, "s.yaml"))
    changed = {t.key for t in plain} ^ {t.key for t in dosed}
    assert changed and all(t.kind in ("optimal", "select") for t in plain + dosed if t.key in changed)


def test_dose_curves_only_where_asked(tmp_path: Path) -> None:
    """optimal.dose_localizers: the groups left out train and score as without dose steps (same trial keys)."""
    from locaudit.study.spec import parse_study
    from locaudit.study.trials import expand

    from test_study_report import STUDY

    (tmp_path / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    plain = {t.key: t for t in expand(parse_study(STUDY, tmp_path, "s.yaml"))}
    some = expand(parse_study({**STUDY, "optimal": {**STUDY["optimal"], "dose_steps": [0.5],
                                                   "dose_localizers": ["top", "all"]}}, tmp_path, "s.yaml"))
    groups = set()
    for t in some:
        if t.kind != "optimal":
            continue
        g = t.localizer.group
        groups.add(g)
        assert ("dose_steps" in t.content) == (g in ("top", "all"))
        assert (t.key in plain) == (g not in ("top", "all"))  # left-out groups keep their keys
    assert {"top", "all"} < groups and groups - {"top", "all"}
