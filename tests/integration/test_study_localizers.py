"""Causal localizers in a study, with the real steps on a tiny random model: the `localize` trials rank every
head, and each candidate (`patching:top2`, `attribution:top2`) is edited at exactly its localizer's top heads,
next to the probe's candidate and the same random draws."""

from __future__ import annotations

import re
from pathlib import Path

from locaudit.localize.effects import HeadEffects
from locaudit.study.ledger import Ledger
from locaudit.study.runner import run_study
from locaudit.study.trials import expand

STUDY = """
name: tiny-localizers
model: {{name: "tiny:llama"}}
data: {{spec: "truthfulqa:{csv}", max_questions: 15}}
localizers:
  probe: {{top_k: 2}}
  random: {{n: 2}}
  single: {{n: 0}}
  all: false
  patching: {{top_k: 2, corruption: noise, max_pairs: 2}}
  attribution: {{top_k: 2, corruption: noise, max_pairs: 2}}
iti: {{alphas: [2.0], localizers: [top, random]}}
optimal: {{enabled: false}}
evaluation: {{metrics: [mc], max_questions: 3, selection: cross-fit}}
verdict: {{primary_metric: mc2}}
"""


def test_causal_candidates_are_edited_at_their_localizers_top_heads(tmp_path: Path, tiny_study) -> None:
    spec = tiny_study(STUDY)
    trials = expand(spec)
    s = run_study(spec, tmp_path / "run", progress=False)
    assert s.failed == 0 and s.done == len(trials)
    with Ledger(tmp_path / "run") as led:
        rows = {r["key"]: r for r in led.rows()}
    localize = {t.content["method"]: t for t in trials if t.kind == "localize"}
    assert set(localize) == {"patching", "attribution"}
    iti = {t.name: t for t in trials if t.kind == "iti"}
    for method, lt in localize.items():
        ranking = HeadEffects.load(tmp_path / "run" / rows[lt.key]["artifacts"]["localize"]).ranking()
        t = next(t for n, t in iti.items() if f"{method}:top2" in n)
        assert t.content["ranking_trial"] == lt.key
        got = sorted(tuple(map(int, m)) for m in re.findall(r"L(\d+)H(\d+)", rows[t.key]["artifacts"]["heads"]))
        assert got == sorted((int(l), int(h)) for l, h in ranking[:2])
    # the report's localizers section: each localizer's split-half stability from its own result, K from the spec
    import json

    from locaudit.study.report import build_report

    rep = build_report(tmp_path / "run", n_resamples=99)
    st = {r["localizer"]: r for r in json.loads((rep.out_dir / "verdict.json").read_text())["localizer_stability"]}
    assert set(st) == {"patching", "attribution"}
    for method, lt in localize.items():
        want = HeadEffects.load(tmp_path / "run" / rows[lt.key]["artifacts"]["localize"]).meta["stability"]
        assert st[method]["k"] == 2 and st[method]["n_pairs"] == 2 and st[method]["overlap"] == want["overlap"]
        assert st[method]["top_all"] == " ".join(want["top_all"])
