"""Does localization inform editing? (Hase et al. 2023): causal tracing vs the best layer to edit a fact.

spec.py (YAML -> HaseSpec), steps.py (facts, tracing, per-layer edits), run.py (trials in the resumable
ledger), analysis.py (the R^2 regressions and the tracing-argmax vs random-layer verdict), report.py
(figures, tables, HTML).
"""
