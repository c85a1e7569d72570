"""The Python API in a few lines: thin, documented wrappers over the modules, accepting strings.

```python
from locaudit import load_model, load_behaviour, collect, probe, locate, fit_iti, train_edit, evaluate_edit

lm = load_model("smollm2-135m-instruct")              # or a hub id, a folder, a .gguf, "tiny:llama"
data = load_behaviour(df)                              # a spec string, a DataFrame or a datasets.Dataset
acts = collect(lm, data)                               # every head's output at the last token (cached)
pr = probe(acts)                                       # one logistic probe per head; pr.ranking()
iti = fit_iti(acts, "top16", probe=pr, alpha=15)       # ITI at the probe's top-16 heads
edit, log = train_edit(lm, data, "top16", probe=pr)    # the optimal localized edit there (IPO)
res = evaluate_edit(lm, edit, data, metrics="mc,kl,ce,pref")
```

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
from locaudit.heads import Head, HeadSet
from locaudit.localize.activations import ActivationSet
from locaudit.localize.probe import ProbeResult
from locaudit.models.loading import DEFAULT_MODEL, LoadedModel

__all__ = ["load_model", "load_behaviour", "collect", "probe", "locate", "fit_iti", "train_edit", "evaluate_edit"]

Rankable = ProbeResult | Sequence[Head] | Mapping[str, Sequence[Head]] | None


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

    return collect_probe_activations(lm, data, _format(format), out, batch_size=batch_size, precision=precision,
                                     progress=progress)


def probe(acts: ActivationSet, l2: float = 1.0, out: str | os.PathLike | None = None) -> ProbeResult:
    """One logistic probe per head (trained on the train split, scored on val); `.ranking()` best first."""
    from locaudit.localize.probe import probe_activations

    res = probe_activations(acts, l2=l2)
    if out is not None:
        res.save(out)
    return res


def _ranking(ranking: Rankable) -> Sequence[Head] | Mapping[str, Sequence[Head]] | None:
    if isinstance(ranking, ProbeResult):
        return ranking.ranking()
    return ranking


def locate(heads: str | HeadSet, shape: LoadedModel | ActivationSet | tuple[int, int],
           ranking: Rankable = None) -> HeadSet:
    """A HeadSet from a location string. `shape`: a model, an activation set or (layers, heads);
    `ranking`: a ProbeResult, a ranking (best first) or {localizer: ranking} for ``patching:top8``."""
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
