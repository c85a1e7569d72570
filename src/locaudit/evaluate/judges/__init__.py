"""Judges of generated answers: probabilities of truthful and informative, behind one interface.

`get_judge(spec)` builds one from a name: `trained:DIR`, `hf:TRUTH_MODEL,INFO_MODEL`,
`api:MODEL@BASE_URL[#KEY_ENV]`, `reference[:METRIC]`, `default[:small]` (locaudit's own judges on
SmolLM2 features, trained on first use; `small` trains on fewer, whole questions, ~4x faster). Wrap it
in `CachedJudge` (get_judge does unless cache=False) so that each (judge, question, answer) is judged once.
"""

from locaudit.evaluate.judges.base import KINDS, Judge, JudgeScore, References, normalise_question
from locaudit.evaluate.judges.cache import CachedJudge
from locaudit.evaluate.judges.reference import ReferenceJudge

__all__ = ["KINDS", "CachedJudge", "Judge", "JudgeScore", "ReferenceJudge", "References", "get_judge",
           "normalise_question"]


def get_judge(spec, **kwargs):
    """See locaudit.evaluate.judges.registry.get_judge."""
    from locaudit.evaluate.judges.registry import get_judge as _get

    return _get(spec, **kwargs)
