"""Which behaviours a judge is valid for, and the check that refuses a judge on data it cannot judge.

A judge object declares `behaviours`; a judge spec string is read without building the judge ('default',
'trained:...', 'hf:...' and 'reference' judge TruthfulQA; 'api:...|rubric=caa:NAME' the rubric's behaviour).
"""

from __future__ import annotations

from locaudit.errors import ConfigError
from locaudit.evaluate.judges.api import parse_api_spec, rubric_behaviours
from locaudit.evaluate.judges.base import ANY_BEHAVIOUR, TRUTHFULQA, Judge, behaviour_key


def _spec_behaviours(spec: str) -> tuple[str, ...] | None:
    """What a judge spec is valid for, without building it; None for an unknown kind (no claim)."""
    kind, _, arg = str(spec).partition(":")
    kind = kind.strip().lower()
    if kind in ("trained", "hf", "reference", "default"):
        return (TRUTHFULQA,)
    if kind == "api":
        return rubric_behaviours(parse_api_spec(arg).get("rubric"))
    return None


def judge_behaviours(judge) -> tuple[str, ...] | None:
    """The behaviours a judge (object or spec string) is valid for; None when it makes no claim."""
    if judge is None:
        return None
    if isinstance(judge, str):
        return _spec_behaviours(judge)
    inner = getattr(judge, "inner", None)  # CachedJudge: the wrapped judge decides
    if isinstance(inner, Judge):
        judge = inner
    b = getattr(judge, "behaviours", None)
    return tuple(b) if b is not None else None


def check_judge(judge, behaviour_spec: str) -> None:
    """Raise ConfigError when `judge` (a Judge or a judge spec such as 'default', 'api:M@URL|rubric=caa:NAME')
    is not valid for the behaviour of data spec `behaviour_spec` ('truthfulqa:...', 'caa:NAME', 'pairs:...')."""
    valid = judge_behaviours(judge)
    if not valid or ANY_BEHAVIOUR in valid:
        return
    want = behaviour_key(behaviour_spec)
    if want in valid:
        return
    name = judge if isinstance(judge, str) else getattr(judge, "name", type(judge).__name__)
    hint = (f"for CAA open-ended answers use an API judge with the behaviour's rubric "
            f"(api:MODEL@BASE_URL|rubric={want}), or score the A/B items with the 'ab' metric and no judge"
            if want.startswith("caa:") else
            "use a judge written for this behaviour (api:MODEL@BASE_URL|rubric=file:RUBRIC.txt), or no judge")
    raise ConfigError(f"judge {name!r} is valid for {', '.join(valid)} only, but the data {behaviour_spec!r} "
                      f"measures {want!r}: its verdicts would not mean anything there; {hint}")
