"""The Python API in a few lines: thin, documented wrappers over the modules, accepting strings.

```python
from locaudit import load_model, load_behaviour, collect, probe, locate, fit_iti, train_edit, evaluate_edit, compare

lm = load_model("smollm2-135m-instruct")              # or a hub id, a folder, a .gguf, "tiny:llama"
data = load_behaviour(df)                              # a spec string, a DataFrame or a datasets.Dataset
acts = collect(lm, data)                               # every head's output at the last token (cached)
pr = probe(acts)                                       # one logistic probe per head; pr.ranking()
iti = fit_iti(acts, "top16", probe=pr, alpha=15)       # ITI at the probe's top-16 heads
edit, log = train_edit(lm, data, "top16", probe=pr)    # the optimal localized edit there (IPO)
res = evaluate_edit(lm, edit, data, metrics="mc,kl,ce,pref")
verdict = compare(res, random=[...], full=..., unedited=..., metric="mc2", k=16)   # vs random locations
```

A model you already hold: ``load_model(model, tokenizer=tok)`` (frozen while locaudit works; ``lm.restore()``
or ``with`` gives its train/grad state back).

Head sets are written in the location language of heads.py (``top16``, ``random16@3``, ``L12H3``,
``all``, ``patching:top8`` ...); formats as ``"plain"`` / ``"chat"``. Every function returns the
library's own objects (LoadedModel, BehaviourData, ActivationSet, ProbeResult, ITIEdit, LoRAEdit,
EvalResult), so nothing here hides what a longer script would do. (The scoring function is
`evaluate_edit`, not `evaluate`: `locaudit.evaluate` is the subpackage, and importing any of its modules
would rebind that name.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from locaudit.data.behaviour import BehaviourData
from locaudit.data.prompts import PromptFormat
from locaudit.edit.base import Edit
from locaudit.edit.iti import ITIEdit
from locaudit.edit.lora import LoRAEdit
from locaudit.edit.train import TrainLog
from locaudit.errors import ConfigError
from locaudit.heads import Head, HeadSet, Ranking
from locaudit.localize.activations import ActivationSet
from locaudit.localize.probe import ProbeResult
from locaudit.models.loading import DEFAULT_MODEL, LoadedModel

__all__ = ["load_model", "load_behaviour", "collect", "probe", "locate", "fit_iti", "train_edit", "evaluate_edit",
           "compare"]

Rankable = ProbeResult | Ranking | Sequence[Head] | Mapping[str, Sequence[Head]] | None


def load_model(name: Any = DEFAULT_MODEL, dtype: str | None = None, device: str | None = None,
               trust_remote_code: bool = False, tokenizer: Any = None) -> LoadedModel:
    """A causal LM with its head sites: hub id, local folder, .gguf file, ``smollm2-135m-instruct`` (the
    embedded default), ``tiny:FAMILY[:SEED]`` (a tiny random model of a registered family, for tests), or a
    model you already hold with its tokenizer: ``load_model(model, tokenizer=tok)``.

    A model you pass is used where it is (its dtype, its device); locaudit freezes it (eval(), no grad,
    with a warning saying what changed) and ``lm.restore()`` or ``with load_model(model, tokenizer=tok) as
    lm:`` gives it back as it was. An unknown name fails at once and names close ones. See
    locaudit.models.loading.load_model."""
    from locaudit.models.loading import load_model as _load

    return _load(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code, tokenizer=tokenizer)


def load_behaviour(source: Any, seed: int = 0, fractions: Sequence[float] = (0.6, 0.2, 0.2),
                   max_questions: int | None = None, name: str | None = None,
                   columns: Mapping[str, str] | None = None, mc_path: str | os.PathLike | None = None) -> BehaviourData:
    """Behaviour data split by question (60/20/20 by default) from:

    - a spec string: ``truthfulqa:PATH.csv``, ``truthfulqa`` (hub), ``caa:NAME_OR_PATH``, ``pairs:PATH``;
    - a pandas DataFrame or a HuggingFace ``datasets.Dataset`` with prompt, chosen, rejected (and
      optional qid) columns; `columns` renames them (``{"prompt": "question"}``), `name` labels the data;
    - a BehaviourData (returned as is).
    """
    if isinstance(source, BehaviourData):
        return source
    if isinstance(source, str):
        from locaudit.data.behaviour import load_behaviour as _load

        return _load(source, seed=seed, fractions=fractions, mc_path=mc_path, max_questions=max_questions)
    from locaudit.data.frames import behaviour_from_table, is_table

    if is_table(source):
        return behaviour_from_table(source, name or "table", seed, fractions, max_questions, columns)
    raise ConfigError(f"load_behaviour: expected a spec string, a pandas DataFrame or a datasets.Dataset, "
                      f"got {type(source).__name__}")


def _format(fmt: str | PromptFormat) -> PromptFormat:
    return fmt if isinstance(fmt, PromptFormat) else PromptFormat(fmt)


def collect(lm: LoadedModel, data: BehaviourData, format: str | PromptFormat = "plain",
            out: str | os.PathLike | None = None, precision: str | None = "auto", batch_size: int = 16,
            progress: bool = True) -> ActivationSet:
    """Every head's output (o_proj input) at the last token of each probe example: Float[N, L, H, D],
    cached by (model, data, format, precision); `out` also receives the files."""
    from locaudit.localize.activations import collect_probe_activations
    from locaudit.models.precision import as_precision

    return collect_probe_activations(lm, data, _format(format), out, batch_size=batch_size,
                                     precision=as_precision(precision, lm.device),
                                     progress=progress)


def probe(acts: ActivationSet, l2: float = 1.0, out: str | os.PathLike | None = None) -> ProbeResult:
    """One logistic probe per head (trained on the train split, scored on val); `.ranking()` best first."""
    from locaudit.localize.probe import probe_activations

    res = probe_activations(acts, l2=l2)
    if out is not None:
        res.save(out)
    return res


def _ranking(ranking: Rankable) -> Ranking | None:
    """A heads.Ranking from a ProbeResult (the probe's ranking) or what `Ranking.of` takes."""
    if isinstance(ranking, ProbeResult):
        return Ranking.of(ranking.ranking())
    return Ranking.of(ranking)


def locate(heads: str | HeadSet, shape: LoadedModel | ActivationSet | tuple[int, int],
           ranking: Rankable = None) -> HeadSet:
    """A HeadSet from a location string. `shape`: a model, an activation set or (layers, heads);
    `ranking`: a ProbeResult, a heads.Ranking, a ranking (best first) or {localizer: ranking} for
    ``patching:top8``."""
    if isinstance(heads, HeadSet):
        return heads
    if isinstance(shape, LoadedModel):
        L, H = shape.sites.n_layers, shape.sites.n_heads
    elif isinstance(shape, ActivationSet):
        L, H = shape.shape[1], shape.shape[2]
    else:
        L, H = shape
    return HeadSet.parse(heads, L, H, ranking=_ranking(ranking))


def fit_iti(acts: ActivationSet, heads: str | HeadSet, probe: ProbeResult | None = None, alpha: float = 15.0,
            direction: str = "mass_mean") -> ITIEdit:
    """ITI at `heads` (a location string or HeadSet; ``top16`` reads `probe`'s ranking): alpha * sigma * u
    added to each chosen head's output at every position. direction: mass_mean or probe."""
    from locaudit.edit.iti import fit_iti as _fit

    return _fit(acts, locate(heads, acts, probe), direction=direction, probe=probe, alpha=alpha)  # type: ignore[arg-type]


def train_edit(lm: LoadedModel, data: BehaviourData, heads: str | HeadSet, probe: Rankable = None,
               format: str | PromptFormat = "plain", **config) -> tuple[LoRAEdit, TrainLog]:
    """The optimal localized edit at `heads` (rank-r LoRA on o_proj, masked to the heads), trained on the
    train pairs with validation on the val pairs. `config`: TrainConfig fields (objective="ipo", tau,
    epochs, lr, rank, precision ...; see edit/config.py)."""
    from locaudit.edit.train import train_edit as _train

    hs = locate(heads, lm, probe)
    return _train(lm, hs, data.pairs("train"), data.pairs("val") or None, _format(format), config or None)


def evaluate_edit(lm: LoadedModel, edit: Edit | None, data: BehaviourData, split: str = "test",
             metrics: str | Sequence[str] = "mc,kl,ce,pref", judge: Any = None,
             out: str | os.PathLike | None = None, **config):
    """Score the edited model (None: unedited) on `split`: metrics among mc, kl, ce, pref, gen; `judge`
    (for gen) a spec such as ``default`` or ``reference:bleu``, or a Judge. `config`: EvalConfig fields
    (format, precision, max_new_tokens ...; see evaluate/runner.py). Returns an EvalResult."""
    from locaudit.evaluate.runner import EvalConfig
    from locaudit.evaluate.runner import evaluate_edit as _evaluate

    if isinstance(judge, str):
        from locaudit.evaluate.judges.registry import get_judge

        judge = get_judge(judge)
    return _evaluate(lm, edit, data, split, metrics, judge, out, EvalConfig(**config) if config else None)


def _scores(x: Any, metric: str, what: str) -> tuple[float | list[float], float | None]:
    """(value or per-question scores, standard error or None) of one edit's result: a number, a sequence of
    per-question scores, or an EvalResult (its `metric` and `metric_se`)."""
    import math

    if hasattr(x, "model_fields") and hasattr(x, "metrics"):  # an EvalResult
        v = getattr(x, metric, None)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ConfigError(f"compare: {what} is an EvalResult without a finite {metric!r} (it has "
                              f"{[m for m in x.metrics]}); pass metric=")
        se = getattr(x, f"{metric}_se", None)
        return float(v), (float(se) if isinstance(se, (int, float)) and math.isfinite(se) else None)
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        if not math.isfinite(x):
            raise ConfigError(f"compare: {what} is {x!r}, not a finite number")
        return float(x), None
    try:
        vals = [float(v) for v in x]
    except (TypeError, ValueError):
        raise ConfigError(f"compare: {what} must be a number, a sequence of per-question scores or an EvalResult; "
                          f"got {type(x).__name__}") from None
    if not vals or not all(math.isfinite(v) for v in vals):
        raise ConfigError(f"compare: {what}'s per-question scores must be finite numbers, at least one")
    return vals, None


def compare(candidate: Any, random: Sequence[Any], *, full: Any = None, unedited: Any = None, metric: str = "score",
            k: int | None = None, alpha: float = 0.05, margin: float = 0.10, multiplicity: str = "holm",
            level: float = 0.95, n_resamples: int = 1999, seed: int = 0):
    """The paper's test from Python: the optimal edit at the candidate location against optimal edits at
    random locations of the same size, decided as a study decides (docs/verdict.md): the candidate's rank
    among the draws, (1 + #draws at least as good) / (n + 1), for *evidence for*; TOST within ±`margin` of
    full alignment's gain over the unedited model for *evidence against*; else *inconclusive*, or *no
    signal* when the metric does not vary or full alignment gains nothing.

    Each result is a number (the metric), a sequence of per-question scores (the same questions, in the
    same order, for every result: the intervals then include question noise, paired across edits), or an
    EvalResult from `evaluate_edit` (its `metric` and standard error). `random`: one result per random
    draw; `full`: the optimal edit at all heads, `unedited`: the model without an edit (both needed for
    *evidence against*). `metric` names the scores (kl, ce ... are lower-is-better); `k` labels the
    candidate ("top-16"). Returns a locaudit.study.analysis.Verdict: `.outcome` ("evidence for",
    "evidence against", "inconclusive", "no signal"), `.headline`, `.lines`, `.table` (the numbers: rank
    p-value and its floor, CI of the difference, TOST bounds ...), `.text()`.

    >>> v = compare(0.71, random=[0.52, 0.49, 0.55, ...], full=0.80, unedited=0.40, k=16)
    >>> v.outcome, v.table[0]["p_rank"]
    """
    import pandas as pd

    from locaudit.study.analysis import BASE_COLUMNS, analyze, verdict
    from locaudit.study.spec import VerdictSpec

    if not isinstance(metric, str) or not metric or metric in BASE_COLUMNS or metric.startswith(("n_", "val_", "train_")) \
            or metric.endswith("_se"):
        raise ConfigError(f"compare: metric={metric!r} is not a usable metric name (not one of {list(BASE_COLUMNS)}, "
                          "not n_*/val_*/train_*/*_se)")
    if isinstance(random, (str, bytes)) or not isinstance(random, Sequence) or len(random) < 2:
        raise ConfigError("compare: random= needs the results of at least 2 random draws (a list)")
    cfg = VerdictSpec(alpha=alpha, margin=margin, multiplicity=multiplicity, level=level, primary_metric=metric)
    results = [("top", f"top{k}" if k else "candidate", candidate, "candidate")]
    results += [("random", f"random{k or ''}@{i}", r, f"random[{i}]") for i, r in enumerate(random)]
    if full is not None:
        results.append(("all", "all", full, "full"))
    rows, perq, lengths = [], {}, {}
    for group, loc, res, what in [*results, *([("none", "baseline", unedited, "unedited")] if unedited is not None else [])]:
        value, se = _scores(res, metric, what)
        key = f"{group}:{loc}"
        if isinstance(value, list):
            lengths[what] = len(value)
            perq[key] = {metric: {f"q{i}": v for i, v in enumerate(value)}}
            value = sum(value) / len(value)
        baseline = group == "none"
        rows.append({"key": key, "kind": "baseline" if baseline else "optimal",
                     "method": "baseline" if baseline else "optimal", "group": group, "localizer": loc,
                     "alpha": None, "tau": None if baseline else 0.1, "lr": None if baseline else 1e-3,
                     "seed": None if baseline else 0, "status": "done", "heads": None, metric: value,
                     **({f"{metric}_se": se} if se is not None else {})})
    if lengths and (len(lengths) < len(rows) or len(set(lengths.values())) > 1):
        plain = [r["localizer"] for r in rows if r["key"] not in perq]
        raise ConfigError(f"compare: per-question scores must be given for every result, over the same questions: "
                          f"lengths {lengths}" + (f"; plain numbers for {plain}" if plain else ""))
    df = pd.DataFrame(rows)
    a = analyze(df, perq or None, cfg, n_resamples=n_resamples, seed=seed, top_k=k)
    return verdict(df, a.comparisons, a.singles, cfg, top_k=k, flags=a.flags, selection=a.selection)
