"""Power and design checks: the formulas against simulation, and `locaudit run --dry-run [--json]`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as sps
from typer.testing import CliRunner

from locaudit.study import stats as S


@pytest.mark.parametrize("shift, n, alpha", [(2.5, 19, 0.05), (2.0, 39, 0.05), (1.0, 39, 0.05), (3.0, 8, 0.2)])
def test_rank_power_matches_simulation(shift: float, n: int, alpha: float) -> None:
    rng = np.random.default_rng(0)
    draws = rng.standard_normal((20000, n))
    p = (1 + (draws >= shift).sum(axis=1)) / (n + 1)
    sim = (p <= alpha + 1e-12).mean()
    assert S.rank_power(shift, n, alpha) == pytest.approx(sim, abs=0.012)


def test_detectable_shift_and_draws_for_power() -> None:
    d = S.detectable_shift(19, 0.05, 0.8)
    assert S.rank_power(d, 19, 0.05) == pytest.approx(0.8, abs=1e-6)
    assert sps.norm.cdf(d) ** 19 == pytest.approx(0.8, abs=1e-6)  # 19 draws: the candidate must beat all of them
    assert math.isinf(S.detectable_shift(8, 0.05))  # floor 1/9 > 0.05: nothing is detectable
    assert S.detectable_shift(99, 0.05) < S.detectable_shift(39, 0.05) < d
    n = S.draws_for_power(2.5, 0.05, 0.8)
    assert S.rank_power(2.5, n, 0.05) >= 0.8 and S.rank_power(2.5, n - 1, 0.05) < 0.8
    assert S.draws_for_power(1.5, 0.05) is None  # 6.7% of draws above: never in the 5% tail


def test_equivalence_power_matches_simulation() -> None:
    rng = np.random.default_rng(1)
    margin, se, alpha = 0.03, 0.012, 0.05
    for true in (0.0, 0.01, 0.02):
        est = rng.normal(true, se, 200000)
        z = sps.norm.ppf(1 - alpha)
        sim = ((est - z * se > -margin) & (est + z * se < margin)).mean()
        assert S.equivalence_power(margin, se, alpha, true) == pytest.approx(sim, abs=0.005)
    se_need = S.se_for_equivalence(margin, alpha, 0.8)
    assert S.equivalence_power(margin, se_need, alpha) == pytest.approx(0.8, abs=1e-9)
    # the narrowest powered margin inverts it: at that margin the power is the target, wider more, narrower less
    m = S.margin_for_equivalence(se, alpha, 0.8)
    assert S.se_for_equivalence(m, alpha, 0.8) == pytest.approx(se)
    assert S.equivalence_power(m, se, alpha) == pytest.approx(0.8, abs=1e-9)
    assert S.equivalence_power(0.9 * m, se, alpha) < 0.8 < S.equivalence_power(1.1 * m, se, alpha)


STUDY = {"name": "design", "model": {"name": "tiny:llama"}, "data": {"spec": "pairs:pairs.jsonl"},
         "localizers": {"probe": {"top_k": 2}, "random": {"n": 8}, "single": {"n": 0}},
         "iti": {"alphas": [2.0]}, "optimal": {"taus": [0.1]}}


def _dry(tmp_path: Path, study: dict, *extra: str):
    from locaudit.cli.main import app

    (tmp_path / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study))
    res = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run"), "--dry-run", *extra])
    assert res.exit_code == 0, res.output
    return res.output


def test_dry_run_prints_floors_power_and_warnings(tmp_path: Path) -> None:
    out = _dry(tmp_path, STUDY)
    assert "optimal: 8 draws, smallest p 0.111; cannot reach 0.05 (needs 19 draws)" in out
    assert "WARNING: optimal: 8 random draws give a rank p-value floor of 0.111" in out
    assert "cost optimal: 10 trials (not measured yet)" in out  # top + 8 draws + all


def test_dry_run_json_is_strict_and_complete(tmp_path: Path) -> None:
    study = {**STUDY, "localizers": {**STUDY["localizers"], "random": {"n": 19, "iti_n": 8}}}
    text = _dry(tmp_path, study, "--json")

    def no_nan(x):
        raise AssertionError(f"non-standard JSON constant {x}")

    d = json.loads(text, parse_constant=no_nan)
    assert d["counts"]["optimal"] == 21 and d["counts"]["iti"] == 9 and len(d["trials"]) == sum(d["counts"].values())
    comp = {c["method"]: c for c in d["design"]["comparisons"]}
    # 19 draws for the optimal edit reach 0.05; ITI's 8 cannot and stays out of the family
    assert comp["optimal"]["p_floor"] == pytest.approx(0.05) and comp["optimal"]["in_family"]
    assert comp["optimal"]["detectable_shift_sd"] == pytest.approx(S.detectable_shift(19, 0.05))
    assert not comp["iti"]["in_family"] and comp["iti"]["detectable_effect"] is None
    assert d["design"]["family_size"] == 1
    assert not any(w.startswith("optimal: 19 random draws") for w in d["design"]["warnings"])
    # alpha x (n + 1) = 1 < 2: only the floor rejects, so the design can report "suggestive" at best
    assert comp["optimal"]["floor_only"] and comp["optimal"]["draws_beyond_floor"] == 39
    assert any(w.startswith("optimal: with 19 draws only the floor") and "use >= 39 draws" in w
               for w in d["design"]["warnings"])
    study39 = {**STUDY, "localizers": {**STUDY["localizers"], "random": {"n": 39, "iti_n": 8}}}
    d39 = json.loads(_dry(tmp_path, study39, "--json"))["design"]
    assert not any("only the floor" in w for w in d39["warnings"])
    assert not {c["method"]: c for c in d39["comparisons"]}["optimal"]["floor_only"]
    assert any(w.startswith("iti: 8 random draws") for w in d["design"]["warnings"])


def test_dry_run_warns_when_two_comparisons_block_each_other(tmp_path: Path) -> None:
    study = {**STUDY, "localizers": {**STUDY["localizers"], "random": {"n": 19}}}
    d = json.loads(_dry(tmp_path, study, "--json"))["design"]
    # Holm over two rank tests with floor 0.05 each: neither can reach 0.025
    assert d["family_size"] == 0
    assert all(c["draws_needed_for_floor"] == 39 for c in d["comparisons"])
    assert sum("cannot show evidence for localization (needs >= 39 draws)" in w for w in d["warnings"]) == 2


def test_dry_run_uses_measured_timings_and_observed_spread(tmp_path: Path) -> None:
    import hashlib

    from locaudit.study.runner import run_study
    from locaudit.study.spec import parse_study

    (tmp_path / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    spec = parse_study(STUDY, tmp_path)

    def fake(trials, spec, run_dir):
        for t in trials:
            rng = np.random.default_rng(int(hashlib.sha256(t.key.encode()).hexdigest()[:8], 16))
            v = {"baseline": 0.3, "iti": 0.5}.get(t.kind, 0.7 + 0.05 * rng.standard_normal())
            yield t.key, {"metrics": {"true": v, "true_se": 0.02} if t.kind not in ("collect", "probe") else {},
                          "artifacts": {}}

    run_study(spec, tmp_path / "run", fn=fake, max_trials=8, progress=False)
    d = json.loads(_dry(tmp_path, STUDY, "--json"))["design"]
    # the kinds with trials done and trials to go get a measured cost; the others say "not measured"
    assert {c["mean_wall_s"] is not None for c in d["cost"].values()} == {True, False}
    measured = {k: c for k, c in d["cost"].items() if c["mean_wall_s"] is not None}
    assert all(c["total_wall_s"] == pytest.approx(c["mean_wall_s"] * c["trials"]) for c in measured.values())
    run_study(spec, tmp_path / "run", fn=fake, progress=False)
    d = json.loads(_dry(tmp_path, STUDY, "--json"))["design"]
    opt = {c["method"]: c for c in d["comparisons"]}["optimal"]
    assert opt["spread"] == "observed" and opt["random_sd"] > 0


def test_run_model_option_runs_the_design_on_another_model(tmp_path: Path) -> None:
    """`--model` keeps the design, changes every trial key, and renames the study and its run folder."""
    from locaudit.cli.run import with_model
    from locaudit.study.spec import parse_study
    from locaudit.study.trials import expand

    base = json.loads(_dry(tmp_path, STUDY, "--json"))
    other = json.loads(_dry(tmp_path, STUDY, "--json", "--model", "tiny:gpt2"))
    assert base["counts"] == other["counts"]
    assert not {t["key"] for t in base["trials"]} & {t["key"] for t in other["trials"]}
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    spec = with_model(parse_study(STUDY, tmp_path), "tiny:gpt2")
    assert spec.model.name == "tiny:gpt2" and spec.name == "design-tiny-gpt2"
    assert spec.default_run_dir() == Path("runs/design-tiny-gpt2")
    assert [t.name for t in expand(spec)] == [t["name"] for t in other["trials"]]


@pytest.mark.parametrize("shift, n, noise", [(2.3, 19, 0.77), (3.0, 39, 1.0), (2.0, 99, 0.5)])
def test_rank_power_with_the_candidates_own_noise_matches_simulation(shift: float, n: int, noise: float) -> None:
    rng = np.random.default_rng(2)
    draws = rng.standard_normal((20000, n))
    c = shift + noise * rng.standard_normal(20000)
    sim = ((1 + (draws >= c[:, None]).sum(axis=1)) / (n + 1) <= 0.05 + 1e-12).mean()
    assert S.rank_power(shift, n, 0.05, noise) == pytest.approx(sim, abs=0.012)
    assert S.rank_power(shift, n, 0.05, noise) < S.rank_power(shift, n, 0.05)  # noise costs power here


def test_detectable_shift_includes_the_candidates_noise() -> None:
    exact = S.detectable_shift(19, 0.05, 0.8)
    noisy = S.detectable_shift(19, 0.05, 0.8, 0.77)
    assert exact == pytest.approx(2.27, abs=0.01) and noisy > exact + 0.3
    assert S.rank_power(noisy, 19, 0.05, 0.77) == pytest.approx(0.8, abs=1e-6)
    whole = S.detectable_shift(19, 0.05, 0.8, 0.77, 12)  # the rank test and the hierarchical t-test
    assert whole >= noisy - 0.05 and S.combined_power(whole, 19, 0.05, 0.77, 12) >= 0.8
    assert S.combined_power(0.0, 19, 0.05, 2.0, 12) <= 0.05 + 0.01  # the null with a noisy candidate
    assert S.draws_for_power(1.5, 0.05, noise=0.5) is None


def test_dry_run_sizes_a_design_by_a_pilot(tmp_path: Path) -> None:
    """--pilot: a finished pilot's observed spread sizes another study (and its timings give the cost);
    the per-question SE is rescaled to the study's question count; a folder without results is refused."""
    import hashlib

    import pandas as pd

    from locaudit.cli.main import app
    from locaudit.cli.run import pilot_spread
    from locaudit.study.runner import run_study
    from locaudit.study.spec import parse_study

    (tmp_path / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    pilot = {**STUDY, "name": "pilot"}

    def fake(trials, spec, run_dir):
        for t in trials:
            rng = np.random.default_rng(int(hashlib.sha256(t.key.encode()).hexdigest()[:8], 16))
            v = {"baseline": 0.3, "iti": 0.5}.get(t.kind, 0.7 + 0.05 * rng.standard_normal())
            yield t.key, {"metrics": {"true": v, "true_se": 0.02} if t.kind not in ("collect", "probe") else {},
                          "artifacts": {}}

    run_study(parse_study(pilot, tmp_path), tmp_path / "pilot", fn=fake, progress=False)
    final = {**STUDY, "localizers": {**STUDY["localizers"], "random": {"n": 39}}, "iti": {"enabled": False}}
    assumed = json.loads(_dry(tmp_path, final, "--json"))["design"]["comparisons"][0]
    d = json.loads(_dry(tmp_path, final, "--json", "--pilot", str(tmp_path / "pilot")))["design"]
    opt = d["comparisons"][0]
    assert assumed["spread"] == "assumed" and opt["spread"] == "observed"
    assert opt["n_random"] == 39 and opt["random_sd"] != assumed["random_sd"]
    assert d["cost"]["optimal"]["mean_wall_s"] is not None  # the pilot's timings
    se_eq = math.sqrt(opt["random_sd"] ** 2 / 39 + opt["se_questions"] ** 2)  # the powered margin: at it, 80% power
    assert S.equivalence_power(opt["powered_margin"], se_eq, opt.get("alpha", 0.05)) == pytest.approx(0.8, abs=1e-6)
    assert opt["powered_margin_fraction"] == pytest.approx(opt["powered_margin"] / opt["gain"])
    # SE ~ 1/sqrt(n): a pilot on 100 questions sizes a study on 400 with half its SE
    obs = pd.DataFrame([{"n_questions": 100, "se_questions": 0.04, "random_sd": 0.1}])
    assert pilot_spread(obs, 400)["se_questions"].iloc[0] == pytest.approx(0.02)
    path = tmp_path / "s.yaml"
    (tmp_path / "empty").mkdir()
    bad = CliRunner().invoke(app, ["run", str(path), "--dry-run", "--pilot", str(tmp_path / "empty")])
    assert bad.exit_code != 0 and "not a run folder" in str(bad.output) + str(bad.exception)
    no_dry = CliRunner().invoke(app, ["run", str(path), "--pilot", str(tmp_path / "pilot")])
    assert no_dry.exit_code != 0 and "--dry-run" in no_dry.output
