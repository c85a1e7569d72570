"""The study's judge, built in one place: for a run's evaluations (steps.context.RunContext.judge) and for
re-judging a finished run with another judge (rejudge.study_judge, `locaudit report RUN --judge`)."""

from __future__ import annotations

from typing import Any

from locaudit.study.spec import StudySpec


def build_judge(spec: StudySpec, judge_spec: str, holdout: tuple[str, ...] | None = None,
                device: str | None = None) -> Any:
    """The judge named `judge_spec`, set up as the study's own: the reference answers of its TruthfulQA file, and a
    judge trained by locaudit never sees the questions of `holdout` (default: `trials.judge_holdout(spec)`, the
    splits the study judges) of exactly its data split (file, seed, fractions, subsample). `device`: default the
    study's model device."""
    from locaudit.evaluate.judges import get_judge
    from locaudit.models.loading import resolve_device
    from locaudit.study.trials import judge_holdout

    d = spec.data
    data_spec = spec.resolved_data_spec()
    refs = data_spec if data_spec.startswith("truthfulqa:") else None
    splits = tuple(sorted(holdout)) if holdout is not None else judge_holdout(spec)
    return get_judge(judge_spec, references=refs, holdout=data_spec, holdout_splits=splits, seed=d.seed,
                     fractions=tuple(d.fractions), max_questions=d.max_questions,
                     device=str(resolve_device(device or spec.model.device)))
