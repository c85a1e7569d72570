"""From ledger rows to the paper's answer: tables, candidate-vs-random comparisons, single heads vs full
alignment, a verdict with one of five outcomes (evidence for, suggestive, evidence against, inconclusive,
no signal), and design (power) checks. docs/verdict.md defines them.

This module gathers the public names of the modules that do each job:
  - `study/frames.py`: ledger rows to tables (trials, results, metric columns, the primary metric,
    candidate localizers, per-question scores);
  - `study/selection.py`: the engine: every location's value per bootstrap replicate and the choice of
    grid points (validation, cross-fit on question-id halves, optimistic);
  - `study/comparisons.py`: candidate vs random draws, single heads vs full alignment, draw flags,
    multiplicity and each comparison's outcome (`analyze`);
  - `study/verdict.py`: the headline and its lines;
  - `study/design.py`: the dry run's design checks.

Conventions:
  - every location is one unit: its training seeds are averaged (per question where per-question scores
    exist) on both sides, so the number of seeds never changes which test answers the question;
  - grid points (alpha, or tau x lr) are chosen per location on the primary metric, never on the data the
    result is reported on: on the validation split when the trials report `val_<metric>`, else by
    cross-fitting on the test questions (choose on one half, read the other, both ways), else (no
    per-question scores) on test, labelled optimistic. The "best on test" view stays, labelled optimistic;
  - "evidence for": the candidate's rank among the random locations, (1 + #draws at least as good) / (n + 1),
    AND a hierarchical t-test of E[candidate - mean of random] > 0 reject (an intersection-union test);
    "suggestive" when only the design's floor carries it; intervals: t-intervals whose standard error adds
    locations, questions (a paired bootstrap, questions resampled jointly) and training seeds;
  - equivalence: a t-calibrated TOST on the candidate-minus-random difference as a fraction of full
    alignment's gain;
  - multiplicity: Holm or Benjamini-Hochberg across the headline table (the primary metric, one row per
    method), the single heads and the secondary metrics, each its own family; several localizers form one
    family by gatekeeping (study/candidates.py).
"""

from __future__ import annotations

from locaudit.study.comparisons import (Analysis, Comparison, analyze, comparisons, draw_flags, gain_fraction,
                                        singles_table)
from locaudit.study.design import design, design_text, equivalence_needs
from locaudit.study.frames import (BASE_COLUMNS, LOWER_IS_BETTER, METHOD_LABEL, METHODS, OUTCOMES, PER_QUESTION_FILES,
                                   PRIMARY_ORDER, PRODUCTS, SELECTION_LABEL, by_localizer, best_per_localizer,
                                   candidates, for_candidate, grid_label, higher_is_better, load_per_question,
                                   merge_selection, metric_columns, metric_label, primary_metric, results_frame,
                                   to_jsonable, trials_frame)
from locaudit.study.verdict import Verdict, decide_hint, verdict

__all__ = ["Analysis", "Comparison", "analyze", "comparisons", "draw_flags", "gain_fraction", "singles_table", "design",
           "design_text", "equivalence_needs", "BASE_COLUMNS", "LOWER_IS_BETTER", "METHOD_LABEL", "METHODS",
           "OUTCOMES", "PER_QUESTION_FILES", "PRIMARY_ORDER", "PRODUCTS", "SELECTION_LABEL", "best_per_localizer",
           "candidates", "for_candidate", "grid_label", "higher_is_better", "load_per_question", "merge_selection",
           "metric_columns", "metric_label", "primary_metric", "results_frame", "to_jsonable", "trials_frame",
           "Verdict", "decide_hint", "verdict"]
