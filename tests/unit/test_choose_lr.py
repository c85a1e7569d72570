"""scripts/choose_lr.py on a tiny validation sweep built in code: it chooses the rate with the best validation MC2
of full alignment (checked against the ledger's own numbers), flags an edge choice, computes the paired SE by
hand, and writes study copies whose optimal.lr is the chosen rate for every group, comments kept."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from eval_fixtures import write_judge_data

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]

SWEEP = """
name: tiny-lr
model: {{name: "tiny:llama"}}
precision: {precision}
data: {{spec: "truthfulqa:{csv}", seed: 1}}
localizers: {{all: true}}
iti: {{enabled: false}}
optimal:
  taus: [0.1]
  lr: {{all: [1.0e-4, 3.0e-2, 3.0e-1]}}
  epochs: 1
  max_train_pairs: 8
  max_val_pairs: 4
  batch_size: 4
  localizers: [all]
  batch_edits: 3
  train_options: {{max_parallel: 3}}
evaluation: {{metrics: [mc], split: val, max_questions: 4}}
verdict: {{primary_metric: mc2}}
"""


def _script():
    spec = importlib.util.spec_from_file_location("choose_lr", REPO / "scripts" / "choose_lr.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_chooses_the_best_validation_rate_and_applies_it(tmp_path: Path, precision, capsys) -> None:
    from locaudit.study.frames import load_per_question
    from locaudit.study.ledger import Ledger
    from locaudit.study.runner import run_study
    from locaudit.study.spec import load_study

    data = tmp_path / "data"
    data.mkdir()
    write_judge_data(data, mc=True)
    f = tmp_path / "sweep.yaml"
    f.write_text(SWEEP.format(csv=data / "TruthfulQA.csv", precision=precision))
    run = tmp_path / "run"
    assert run_study(load_study(f), run, progress=False).failed == 0
    cl = _script()
    table, base, nq = cl.sweep_table(run, "mc2")
    assert [r["lr"] for r in table] == [1e-4, 3e-2, 3e-1] and nq == 4
    with Ledger(run) as led:
        rows = led.rows(status="done")
    per = load_per_question(run, rows)
    for r in table:  # each rate's score is its trial's mean MC2; the gain's SE is the paired one, by hand
        key = next(k["key"] for k in rows if k["kind"] == "optimal" and
                   abs(float((k["metrics"] or {}).get("mc2", -1)) - r["score"]) < 1e-12)
        b = next(per[k["key"]]["mc2"] for k in rows if k["kind"] == "baseline")
        d = [per[key]["mc2"][q] - b[q] for q in b]
        m = sum(d) / len(d)
        assert r["gain"] == pytest.approx(m)
        assert r["se"] == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)))
    c = cl.choose(table)
    assert c["score"] == max(r["score"] for r in table)
    assert c["at_edge"] == (c["lr"] in (1e-4, 3e-1))
    code = cl.main([str(run), "--apply", str(f), "--out-dir", str(tmp_path / "out")])
    assert code == (0 if c["measurable"] else 1)
    assert "<- chosen" in capsys.readouterr().out
    spec2 = load_study(tmp_path / "out" / "sweep.yaml")
    assert {g: getattr(spec2.optimal.lr, g) for g in ("top", "random", "single", "all")} == \
        {g: [pytest.approx(c["lr"], rel=1e-3)] for g in ("top", "random", "single", "all")}


def test_rule_flags_edges_and_unmeasurable_gains() -> None:
    cl = _script()
    rows = [{"lr": 1e-3, "score": 0.5, "gain": 0.10, "se": 0.02}, {"lr": 2e-3, "score": 0.6, "gain": 0.2, "se": 0.02},
            {"lr": 4e-3, "score": 0.55, "gain": 0.15, "se": 0.02}]
    c = cl.choose(rows)
    assert c["lr"] == 2e-3 and not c["at_edge"] and c["measurable"]
    c = cl.choose([dict(r, score=r["score"] + (1 if r["lr"] == 4e-3 else 0)) for r in rows])
    assert c["lr"] == 4e-3 and c["at_edge"]
    c = cl.choose([dict(r, gain=0.03) for r in rows])  # 1.5 SE: not measurable
    assert not c["measurable"]


def test_apply_needs_a_one_line_lr() -> None:
    cl = _script()
    text = "name: x\noptimal:\n  taus: [0.1]\n  lr: {top: [1e-3], all: [1e-4]}   # old\n  epochs: 1\nevaluation: {}\n"
    out = cl.apply_lr(text, 2.5e-4, "x.yaml")
    assert "lr: {top: [0.00025], random: [0.00025], single: [0.00025], all: [0.00025]}" in out
    assert out.replace(out.splitlines()[3], "") == text.replace(text.splitlines()[3], "")  # nothing else changes
    with pytest.raises(SystemExit, match="one-line"):
        cl.apply_lr("optimal:\n  lr:\n    top: [1e-3]\n", 1e-3, "y.yaml")


def test_in_place_and_out_dir_are_exclusive(tmp_path: Path) -> None:
    cl = _script()
    from locaudit.errors import ConfigError

    for bad in ([], ["--in-place", "--out-dir", str(tmp_path)]):
        with pytest.raises(SystemExit):  # checked before the sweep is read
            cl.main([str(tmp_path), "--apply", "x.yaml", *bad])
    with pytest.raises(ConfigError, match="ledger.sqlite is missing"):
        cl.main([str(tmp_path)])
