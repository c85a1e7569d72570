"""Metrics of fact edits (ROME / Hase et al. 2023), from object probabilities before and after an edit.

p(o | prompt) is the probability of the whole object (product over its tokens, teacher-forced after the
prompt, prompt tokens never count). For the editing problems of Hase et al.:

| problem              | target object | rewrite score                                   | efficacy                 |
|----------------------|---------------|-------------------------------------------------|--------------------------|
| error_injection      | o_new         | (p_post(o_new) - p_pre(o_new)) / (1 - p_pre(o_new)) | p_post(o_new) > p_post(o_true) |
| tracing_reversal     | o_noise       | same with o_noise, the corrupted run's top token | p_post(o_noise) > p_post(o_true) |
| fact_erasure         | o_true (down) | (p_pre(o_true) - p_post(o_true)) / p_pre(o_true)  | p_post(o_true) < p_pre(o_true) / 2 |
| fact_amplification   | o_true (up)   | (p_post(o_true) - p_pre(o_true)) / (1 - p_pre(o_true)) | p_post(o_true) > p_pre(o_true) |
| fact_forcing         | o_true (up, subject noised) | as fact_amplification, on the noised prompt | p_post(o_true) > p_post(o_noise) |

Fact forcing (Hase et al. 2023, google/belief-localization `--fact_forcing`): the edit must make the model give
the true object when the subject's token embeddings are noised as in causal tracing (the corrupted run). The
edit is trained on the noised prompt (noise on the subject's embeddings, several noise samples for fine-tuning,
one for ROME / MEMIT, as the paper) and measured on it: p_pre and p_post are probabilities under the same noise
(the paper draws both from one seed; here the rewrite prompt is scored under the first training sample). The
efficacy compares o_true with o_noise, the corrupted run's most likely next token (the paper's
`request_baseline`); where that token is the object's own first token (the noise does not move the prediction)
there is no baseline and the efficacy is p_post(o_true | noised) > p_pre(o_true | noised).

Neighbourhood specificity (ROME's NS, for problems with a new object): the share of other facts of the same
relation whose own object stays more likely than the new object after the edit. `neighbour_drift`
(every problem): mean |log p_post - log p_pre| of the neighbours' own objects.
Fluency (n-gram entropy of generations) is not computed: it needs generation per (fact, layer) edit.

Hase et al.'s measures (google/belief-localization, experiments/evaluate.py), each a number per edit:
  paraphrase_score         the rewrite score on each paraphrase of the prompt, averaged (generalisation). Needs
                           paraphrase prompts (CounterFact's `paraphrase_prompts`); known_1000 has none, and
                           CounterFact is not in the data root, so with known_1000 this measure is absent;
  neighbourhood_stability  Hase's neighbourhood score (specificity): on each neighbour prompt, the probability
                           p of the edit's target object (o_new, o_noise, or o_true for erasure/amplification)
                           must not move: 1 - |p_post - p_pre| / (|p_pre - 0.5| + 0.5) (1 = unchanged, 0 = the
                           largest change possible), averaged over neighbours. CounterFact's neighbours share
                           the edited fact's true object; here they are other known facts of the same relation;
  combined_score           the harmonic mean of rewrite, paraphrase (where present) and neighbourhood scores,
                           each clipped at 0 (Hase's target_score; 0 when any is <= 0).
"""

from __future__ import annotations

import math
from typing import Sequence

PROBLEMS = ("error_injection", "tracing_reversal", "fact_erasure", "fact_amplification", "fact_forcing")
NEW_OBJECT_PROBLEMS = ("error_injection", "tracing_reversal")
# problems whose edited prompt is the corrupted one (the subject's embeddings noised, as in causal tracing)
NOISED_PROBLEMS = ("fact_forcing",)


def _p(logp: float) -> float:
    return math.exp(min(0.0, float(logp)))


def rewrite_score(problem: str, pre_true: float, post_true: float, pre_new: float | None = None,
                  post_new: float | None = None) -> float:
    """The rewrite score of `problem` from log-probabilities (1 = the edit did all it could, 0 = nothing,
    negative = the wrong way)."""
    if problem in NEW_OBJECT_PROBLEMS:
        a, b = _p(pre_new), _p(post_new)
        return (b - a) / max(1.0 - a, 1e-12)
    a, b = _p(pre_true), _p(post_true)
    if problem == "fact_erasure":
        return (a - b) / max(a, 1e-12)
    if problem in ("fact_amplification", "fact_forcing"):
        return (b - a) / max(1.0 - a, 1e-12)
    raise ValueError(f"editing problem {problem!r} is not one of {PROBLEMS}")


def efficacy(problem: str, pre_true: float, post_true: float, post_new: float | None = None) -> float:
    """1.0 if the edit reached its goal (see the table above), else 0.0. fact_forcing: `post_new` is the
    log-prob of the corrupted run's prediction o_noise (None: no baseline, compared with `pre_true`)."""
    if problem == "fact_forcing":
        return float(post_true > (post_new if post_new is not None else pre_true))
    if problem in NEW_OBJECT_PROBLEMS:
        return float(post_new > post_true)
    if problem == "fact_erasure":
        return float(post_true < pre_true - math.log(2.0))
    if problem == "fact_amplification":
        return float(post_true > pre_true)
    raise ValueError(f"editing problem {problem!r} is not one of {PROBLEMS}")


def neighbourhood(problem: str, nb_pre_true: Sequence[float], nb_post_true: Sequence[float],
                  nb_post_new: Sequence[float] | None = None) -> dict[str, float]:
    """Specificity on neighbour facts: `neighbourhood_score` (NS, new-object problems) and `neighbour_drift`."""
    out: dict[str, float] = {}
    if not len(nb_pre_true):
        return out
    out["neighbour_drift"] = sum(abs(b - a) for a, b in zip(nb_pre_true, nb_post_true)) / len(nb_pre_true)
    if problem in NEW_OBJECT_PROBLEMS and nb_post_new is not None:
        out["neighbourhood_score"] = sum(float(t > n) for t, n in zip(nb_post_true, nb_post_new)) / len(nb_post_true)
    return out


def paraphrase_score(problem: str, pre_true: Sequence[float], post_true: Sequence[float],
                     pre_new: Sequence[float] | None = None, post_new: Sequence[float] | None = None) -> float:
    """The mean rewrite score over paraphrase prompts (NaN without paraphrases)."""
    if not len(pre_true):
        return float("nan")
    n = len(pre_true)
    pn = pre_new if pre_new is not None else [None] * n
    qn = post_new if post_new is not None else [None] * n
    return sum(rewrite_score(problem, a, b, c, d) for a, b, c, d in zip(pre_true, post_true, pn, qn)) / n


def neighbourhood_stability(pre_target: Sequence[float], post_target: Sequence[float]) -> float:
    """Hase's neighbourhood score from the log-probs of the edit's target object on neighbour prompts:
    mean of 1 - |p_post - p_pre| / (|p_pre - 0.5| + 0.5) (NaN without neighbours)."""
    if not len(pre_target):
        return float("nan")
    out = []
    for a, b in zip(pre_target, post_target):
        p, q = _p(a), _p(b)
        out.append(1.0 - abs(q - p) / (abs(p - 0.5) + 0.5))
    return sum(out) / len(out)


def combined_score(*scores: float) -> float:
    """Harmonic mean of the scores that are not NaN, each clipped at 0 (0 if any is <= 0)."""
    xs = [max(0.0, float(x)) for x in scores if x == x]
    if not xs:
        return float("nan")
    if min(xs) <= 0:
        return 0.0
    return len(xs) / sum(1.0 / x for x in xs)


def fact_metrics(problem: str, pre: dict, post: dict) -> dict[str, float]:
    """All metrics of one edit. `pre` / `post`: {"true": logp, "new": logp, "nb_true": [..], "nb_new": [..],
    optionally "nb_target": [..] (the edit's target object on each neighbour prompt), "para_true": [..],
    "para_new": [..] (the paraphrase prompts)}.
    For fact_forcing, "true" (and "para_true") are scored on the noised-subject prompt, and "new", when present, is
    the corrupted run's prediction o_noise on it (the efficacy's baseline)."""
    m = {
        "rewrite_score": rewrite_score(problem, pre["true"], post["true"], pre.get("new"), post.get("new")),
        "efficacy": efficacy(problem, pre["true"], post["true"], post.get("new")),
        "p_true_pre": _p(pre["true"]), "p_true_post": _p(post["true"]),
    }
    if problem in NEW_OBJECT_PROBLEMS:
        m["p_new_pre"], m["p_new_post"] = _p(pre["new"]), _p(post["new"])
    elif problem == "fact_forcing" and "new" in pre:
        m["p_noise_top_pre"], m["p_noise_top_post"] = _p(pre["new"]), _p(post["new"])
    m.update(neighbourhood(problem, pre.get("nb_true", []), post.get("nb_true", []), post.get("nb_new")))
    if "nb_target" in pre:
        m["neighbourhood_stability"] = neighbourhood_stability(pre["nb_target"], post["nb_target"])
    if "para_true" in pre:
        m["paraphrase_score"] = paraphrase_score(problem, pre["para_true"], post["para_true"], pre.get("para_new"),
                                                 post.get("para_new"))
    if "nb_target" in pre or "para_true" in pre:
        m["combined_score"] = combined_score(m["rewrite_score"], m.get("paraphrase_score", float("nan")),
                                             m.get("neighbourhood_stability", float("nan")))
    return m
