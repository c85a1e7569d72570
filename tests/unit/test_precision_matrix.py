"""The precision matrix: one tiny end-to-end study, every step kind, under fp32, bf16 and fp16 on CPU.

Autocast works on any CPU, and a tiny random model keeps every step quick even where bf16 is emulated.
Each precision runs the same steps from the same data:

- judge training (the shared-prompt features included) and judge scoring of a fixed set of answers;
- a study: collect, probe, both causal localizers (activation and attribution patching), the judge-scored
  baseline, ITI, optimal training (packed pairs, the frozen prefix, grouped edits, a dose snapshot) and their
  evaluations (the dose point's MC and KL too);
- rejudge (`locaudit report RUN --judge ...`) and export (merged model, PEFT adapter);
- Hase: facts, tracing and per-layer edits (ft, lora, memit over a 2-layer window).

Every trial must end `done`, every number must be finite, and the numbers that do not pass through a greedy
choice must lie within `TOLERANCE` of fp32 (greedy generations can legitimately differ at lower precision,
so their judgements are checked for completeness, and the judge itself is compared on fixed answers).

`LOCAUDIT_TEST_DEVICE=cuda` runs the same matrix on a GPU (benchmarks/gpu_check.sh does).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from locaudit.models.precision import clear_cache

from eval_fixtures import write_judge_data

pytestmark = pytest.mark.usefixtures("one_thread")

PRECISIONS = ("fp32", "bf16", "fp16")
DEVICE = os.environ.get("LOCAUDIT_TEST_DEVICE", "cpu")
# Tolerances against fp32, by quantity: (absolute, relative). bf16 keeps 8 bits of mantissa, fp16 11: the
# rounding of a few bf16 matmuls moves a log-prob by ~1e-2 relative, so scores derived from log-probs move by a
# few percent, while a wrong dtype path is off by O(1) or not finite. `test_fp32_is_the_reference` checks that
# each quantity is large beside its absolute tolerance, so no tolerance is vacuous.
TOLERANCE = {
    "mc2": (0.03, 0.0), "mc1": (0.34, 0.0),          # mc1 is a 0/1 per question: one flip in 3 questions
    "kl": (1e-3, 0.25), "ce": (0.01, 0.005),
    "probe_val_acc": (0.15, 0.0),                      # a per-head accuracy on ~40 examples
    "judge_p": (0.03, 0.0),                            # judge probabilities on fixed answers
    "effect": (0.1, 0.0),                              # patching / attribution effects, as a share of the largest
                                                       # |effect| (each is a difference of two noisy forwards)
    "hase": (0.0, 0.25),                               # Hase scores and tracing effects (tiny probabilities)
    "hase_share": (0.25, 0.0),                         # a share of 4 facts (efficacy): one flip
}

FACTS = [("Paris", "R1", "France"), ("Rome", "R1", "Italy"), ("Tokyo", "R2", "Japan"), ("Lima", "R2", "Peru")]

STUDY = """
name: tiny-precision-{precision}
model: {{name: "tiny:llama", device: {device}}}
precision: {precision}
data: {{spec: "truthfulqa:{csv}", seed: 1}}
localizers:
  probe: {{top_k: 2}}
  random: {{n: 2}}
  single: {{n: 1, seed: 0}}
  all: true
  patching: {{top_k: 2, corruption: noise, max_pairs: 2}}
  attribution: {{top_k: 2, corruption: noise, max_pairs: 2}}
iti: {{alphas: [2.0], localizers: [top, random]}}
optimal:
  taus: [0.1]
  epochs: 1
  max_train_pairs: 8
  max_val_pairs: 4
  batch_size: 4
  localizers: [top, random, single, all]
  batch_edits: 6
  train_options: {{max_parallel: 3, frozen_prefix: true}}
  dose_steps: [1]
evaluation:
  metrics: [mc, kl, ce, gen]
  judge: "trained:{judge}"
  max_questions: 3
  max_new_tokens: 6
  kl_max_tokens: 64
  selection: cross-fit
verdict: {{primary_metric: mc2}}
"""

HASE = (
    "name: tiny-hase-{precision}\nmodel: {{name: 'tiny:llama', device: {device}}}\nprecision: {precision}\n"
    "facts: {{path: facts.jsonl, known_top_k: 259, max_facts: 4, n_neighbours: 1}}\n"
    # layers 0 and 1 of 3: memit's z sits at its window's last layer, and at the model's last layer the subject
    # position no longer reaches the prediction (a no-op edit: rewrite 0 in fp32, rounding noise elsewhere)
    "tracing: {{n_noise: 2, kinds: [mlp], grid_facts: 0}}\nlayers: [0, 1]\n"
    "editing: {{problems: [error_injection], methods: [ft, lora, memit],\n"
    "  ft: {{steps: 2, lr: 0.05, norm_bound: 0.1, batch_facts: 4}}, lora: {{steps: 2, lr: 0.1, batch_facts: 4}},\n"
    "  memit: {{steps: 2, lr: 0.5, batch_facts: 4, cov_tokens: 600, window: 2, mom2_update_weight: 10}}}}\n"
    "analysis: {{bootstrap: 20}}\n"
)


def _write_data(d: Path) -> None:
    write_judge_data(d, mc=True)
    facts = [{"id": str(i), "subject": s, "prompt": f"{s} is a city in", "target": o, "relation_id": r}
             for i, (s, r, o) in enumerate(FACTS)]
    (d / "facts.jsonl").write_text("".join(json.dumps(f) + "\n" for f in facts))


def _cli(*args: str) -> str:
    from typer.testing import CliRunner

    from locaudit.cli.main import app

    res = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def _finite(obj, where: str = "") -> None:
    """Every number in a JSON-like structure is finite."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _finite(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _finite(v, f"{where}[{i}]")
    elif isinstance(obj, float):
        assert math.isfinite(obj), f"non-finite number at {where}"


def _run_one(precision: str, root: Path, data: Path) -> dict:
    """Every step kind at `precision`; returns what is compared across precisions."""
    from locaudit.evaluate.judges.train import JudgeTrainConfig, train_judge
    from locaudit.evaluate.judges.trained import load_trained_judge
    from locaudit.localize.effects import HeadEffects
    from locaudit.models.loading import load_model
    from locaudit.study.hase.run import run_hase
    from locaudit.study.hase.spec import load_hase_spec
    from locaudit.study.ledger import Ledger
    from locaudit.study.runner import run_study
    from locaudit.study.spec import load_study
    from locaudit.study.trials import expand

    out: dict = {}
    root.mkdir(parents=True)
    lm = load_model("tiny:llama", device=DEVICE)
    # judge training (features with the shared prompt, empty answers included) and scoring
    cfg = JudgeTrainConfig(kinds=["truth", "info"], model="tiny:llama", truth_data=data / "truth.jsonl",
                           info_data=data / "info.jsonl", holdout=f"truthfulqa:{data / 'TruthfulQA.csv'}",
                           seed=1, layers=[0, 2], batch_size=8, l2_grid=[1e-1], heads=["logistic"],
                           precision=precision, audit=False, device=DEVICE)
    judge_dir = root / "judge"
    train_judge(cfg, judge_dir, lm=lm)
    saved = json.loads((judge_dir / "judge.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in judge.json"))
    _finite(saved, "judge.json")
    judge = load_trained_judge(judge_dir, device=DEVICE, lm=lm, precision=precision)
    # one question with several answers (the shared-prompt path), an empty one among them: a row with no
    # answer token takes the prompt's last state (the bf16 path that once failed)
    qs = ["What is true about cats?"] * 4 + ["What is true about rain?"]
    ans = ["They are studied by scientists", "", "They cause bad luck forever", "Nothing special", "Rain is wet"]
    js = judge.score(qs, ans)
    out["judge_p"] = [float(j.truth) for j in js] + [float(j.info) for j in js]

    # the study
    spec_path = root / "study.yaml"
    spec_path.write_text(STUDY.format(precision=precision, csv=data / "TruthfulQA.csv", judge=judge_dir, device=DEVICE))
    spec = load_study(spec_path)
    trials = expand(spec)
    kinds = {t.kind for t in trials}
    assert {"collect", "probe", "localize", "baseline", "iti", "optimal"} <= kinds, kinds
    run = root / "run"
    s = run_study(spec, run, progress=False)
    with Ledger(run) as led:
        rows = {r["key"]: r for r in led.rows()}
    bad = {rows[t.key]["name"]: (rows[t.key]["status"], rows[t.key].get("error")) for t in trials
           if rows[t.key]["status"] != "done"}
    assert s.failed == 0 and not bad, f"{precision}: {bad}"
    assert s.done == len(trials)
    for r in rows.values():
        _finite(r.get("metrics") or {}, f"{precision} {r['name']}")
        assert r["artifacts"]["precision"] == precision, r["name"]
    out["metrics"] = {r["name"]: {k: v for k, v in (r.get("metrics") or {}).items()
                                  if k in ("mc1", "mc2", "kl", "ce")}
                      for r in rows.values() if r["kind"] in ("baseline", "iti", "optimal")}
    for r in rows.values():  # the dose snapshot (step 1) of each optimal edit: its MC and KL are compared too
        if r["kind"] == "optimal":
            assert r["metrics"]["n_dose_points"] == 2, r["name"]
            for p in json.loads((run / r["artifacts"]["dose"]).read_text())["points"]:
                if not p["final"]:
                    out["metrics"][f"{r['name']} dose@{p['step']}"] = {k: v for k, v in p["metrics"].items()
                                                                       if k in ("mc1", "mc2", "kl")}
    gen = [r for r in rows.values() if r["kind"] in ("baseline", "iti", "optimal") and "true" in (r.get("metrics") or {})]
    assert gen, "no judged generations"
    from locaudit.study.ledger import artifact_dir  # noqa: F401  (the layout the report reads)
    out["effects"] = {}
    for t in trials:
        if t.kind == "localize":
            eff = HeadEffects.load(run / rows[t.key]["artifacts"]["localize"])
            out["effects"][t.content["method"]] = eff.effect.float().flatten().tolist()
    probe = next(t for t in trials if t.kind == "probe")
    out["probe_val_acc"] = rows[probe.key]["metrics"].get("top_k_mean_val_acc")

    # rejudge: the saved answers re-scored by the same trained judge at this precision give the study's numbers
    from locaudit.study.rejudge import rejudge_rows

    again, summary = rejudge_rows(run, gen, judge, progress=False)
    assert summary["scored"] > 0
    for old, new in zip(gen, again):
        for k in ("true", "info", "true_info"):
            if k in old["metrics"]:
                assert new["metrics"][k] == pytest.approx(old["metrics"][k], abs=1e-6), (precision, old["name"], k)
    # export an optimal and an ITI edit
    exp = {t.kind: t for t in trials if t.kind in ("iti", "optimal")}
    for kind, t in exp.items():
        _cli("export", str(run), "--trial", t.key, "--out", str(root / f"export-{kind}"), "--model", "tiny:llama")
        assert (root / f"export-{kind}" / "merged" / "config.json").is_file()

    # Hase: facts, tracing, per-layer edits
    (root / "facts.jsonl").write_text((data / "facts.jsonl").read_text())
    (root / "hase.yaml").write_text(HASE.format(precision=precision, device=DEVICE))
    res = run_hase(load_hase_spec(root / "hase.yaml"), root / "hase", progress=False)
    assert not res["counts"].get("failed") and res["counts"].get("done", 0) == 2 + 3 * 2, res["counts"]
    with Ledger(root / "hase") as led:
        hrows = led.rows()
    for r in hrows:
        _finite(r.get("metrics") or {}, f"{precision} hase {r['name']}")
        assert precision in json.dumps(r.get("content") or r), r["name"]  # the key records the precision
    out["hase"] = {r["name"]: {k: v for k, v in (r.get("metrics") or {}).items() if isinstance(v, float)}
                   for r in hrows}
    return out


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    _write_data(data)
    clear_cache()
    return {p: _run_one(p, tmp_path_factory.mktemp(p) / "r", data) for p in PRECISIONS}


def _close(a: float, b: float, tol: tuple[float, float]) -> bool:
    return abs(a - b) <= tol[0] + tol[1] * abs(b)


@pytest.mark.parametrize("precision", PRECISIONS[1:])
def test_every_step_matches_fp32(matrix, precision) -> None:
    ref, got = matrix["fp32"], matrix[precision]
    # the judge on fixed answers
    for a, b in zip(got["judge_p"], ref["judge_p"]):
        assert _close(a, b, TOLERANCE["judge_p"]), (precision, got["judge_p"], ref["judge_p"])
    # every edit's and the baseline's score metrics
    assert set(got["metrics"]) == set(ref["metrics"])
    for name, m in ref["metrics"].items():
        for k, v in m.items():
            assert _close(got["metrics"][name][k], v, TOLERANCE[k]), (precision, name, k, got["metrics"][name][k], v)
    # causal localizers' effects, probing
    for method, eff in ref["effects"].items():
        scale = max(abs(x) for x in eff)
        for a, b in zip(got["effects"][method], eff):
            assert abs(a - b) <= TOLERANCE["effect"][0] * scale, (precision, method, a, b, scale)
    if ref["probe_val_acc"] is not None:
        assert _close(got["probe_val_acc"], ref["probe_val_acc"], TOLERANCE["probe_val_acc"])
    # Hase
    assert set(got["hase"]) == set(ref["hase"])
    for name, m in ref["hase"].items():
        for k, v in m.items():
            if k in got["hase"][name]:
                tol = TOLERANCE["hase_share" if k in ("efficacy",) or k.startswith("n_") or name == "facts" else "hase"]
                assert _close(got["hase"][name][k], v, tol), (precision, name, k, got["hase"][name][k], v)


def test_fp32_is_the_reference(matrix) -> None:
    """The fp32 run itself: every step ran, and its numbers are far from degenerate beside each tolerance (an
    MC2 of 1e-15 or a KL of 1e-6 would make any tolerance pass)."""
    ref = matrix["fp32"]
    assert ref["metrics"] and ref["effects"] and ref["hase"]
    base = next(m for n, m in ref["metrics"].items() if n == "baseline")
    assert 0.1 < base["mc2"] < 0.9, base
    kls = [m["kl"] for n, m in ref["metrics"].items() if n != "baseline" and "kl" in m]
    assert kls and max(kls) > 10 * TOLERANCE["kl"][0]
    assert min(m["ce"] for m in ref["metrics"].values() if "ce" in m) > 10 * TOLERANCE["ce"][0]  # dose points: no CE
    for method, e in ref["effects"].items():
        assert max(abs(x) for x in e) > 1e-3, method  # effects that are there to compare
    assert any(0.1 < p < 0.9 for p in ref["judge_p"]), ref["judge_p"]
    scores = [v for n, m in ref["hase"].items() for k, v in m.items() if k in ("rewrite_score", "mean_max_effect_mlp")]
    assert scores and all(v > 0 for v in scores)
