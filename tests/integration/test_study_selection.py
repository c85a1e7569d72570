"""Nested selection with the real steps on a tiny random model: gridded trials get a 'select' trial that
scores their edit on the validation split; the results carry `val_<metric>` and the report chooses each
location's grid point there (not on test)."""

from __future__ import annotations

from pathlib import Path

from locaudit.study.analysis import analyze, load_per_question, results_frame
from locaudit.study.ledger import Ledger
from locaudit.study.runner import run_study
from locaudit.study.trials import expand

STUDY = """
name: tiny-selection
model: {{name: "tiny:llama"}}
data: {{spec: "truthfulqa:{csv}", max_questions: 15}}
localizers: {{probe: {{top_k: 2}}, random: {{n: 2}}, single: {{n: 0}}, all: false}}
iti: {{alphas: [1.0, 4.0], localizers: [top, random]}}
optimal: {{enabled: false}}
evaluation: {{metrics: [mc, kl], max_questions: 3, val_max_questions: 2}}
verdict: {{primary_metric: mc2}}
"""


def test_select_trials_score_on_validation(tmp_path: Path, tiny_study) -> None:
    spec = tiny_study(STUDY)
    trials = expand(spec)
    iti = [t for t in trials if t.kind == "iti"]
    sel = [t for t in trials if t.kind == "select"]
    assert len(iti) == 6 and len(sel) == 6
    assert all(t.content["select"] == {"split": "val", "max_questions": 2, "metrics": ["mc"]} for t in sel)

    s = run_study(spec, tmp_path / "run", progress=False)
    assert s.failed == 0 and s.done == len(trials)
    with Ledger(tmp_path / "run") as led:
        rows = led.rows()
    by = {r["key"]: r for r in rows}
    for t in sel:
        m = by[t.key]["metrics"]
        assert set(m) >= {"val_mc1", "val_mc2"} and "mc2" not in m
        res = by[t.key]["artifacts"]["eval"]
        assert (tmp_path / "run" / res / "result.json").exists()
        assert '"split": "val"' in (tmp_path / "run" / res / "result.json").read_text()
    df = results_frame(rows)
    assert df.loc[df["kind"] == "iti", "val_mc2"].notna().all()
    assert df.loc[df["kind"] == "baseline", "val_mc2"].isna().all()
    an = analyze(df, load_per_question(tmp_path / "run", rows), spec.verdict, n_resamples=99)
    assert an.selection["iti"] == "validation"
