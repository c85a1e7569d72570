"""A causal localizer's ranking of every head, cached by content (activation patching, attribution patching, or
any localizer registered in localize/registry.py).

`localize_heads(lm, data, method, config, split)` runs the registered localizer `method` on the pairs of a split
and returns HeadEffects; the CLI's `locaudit localize` and the studies' localize trials call it.
"""

from __future__ import annotations

import os

from locaudit.errors import ConfigError, DataError
from locaudit.io import cache_dir, stable_hash
from locaudit.localize.corruptions import PatchingConfig, select_pairs
from locaudit.localize.effects import HeadEffects
from locaudit.localize.patching import VERSION
from locaudit.localize.registry import causal_localizer, causal_names
from locaudit.models.precision import ResolvedPrecision, require_resolved

METHODS = causal_names()  # the built-in ones; localize/registry.causal_names() lists every registered one


def localization_key(lm, data_fingerprint: str, method: str, config, split: str,
                     precision: ResolvedPrecision) -> str:
    """Cache key: model content and dtype, data content, split, method, config and numerics."""
    return stable_hash({"model": lm.fingerprint, "model_dtype": str(lm.dtype), "data": data_fingerprint,
                        "split": split, "method": method, "config": config.model_dump(),
                        "precision": require_resolved(precision, "causal").key, "version": VERSION})


def localize_heads(lm, data, method: str = "patching", config: PatchingConfig | dict | None = None,
                   split: str = "train", out_dir: str | os.PathLike | None = None, *, precision: ResolvedPrecision,
                   cache: bool = True, progress: bool = True) -> HeadEffects:
    """Rank every head of `lm` for the behaviour `data` (a BehaviourData) by the registered causal localizer
    `method` (localize/registry.py: "patching", "attribution", ...) on the pairs of `split`.

    Cached under cache_dir("localize", key) by (model fingerprint, data fingerprint, split, method, config,
    precision key): a second call reads the cache. `out_dir` also receives the files (HeadEffects.save).
    """
    loc = causal_localizer(method)
    config = loc.make_config(config)
    key = localization_key(lm, data.fingerprint, method, config, split, precision)
    target = cache_dir("localize", key) if cache else None
    if target is not None and (target / "meta.json").exists():
        try:
            eff = HeadEffects.load(target)
            if eff.meta.get("key") == key and nonfinite_problem(eff, config) is None:
                if out_dir is not None:
                    eff.save(out_dir)
                return eff
        except DataError:
            pass  # a damaged entry is recomputed
    pairs = select_pairs(data.pairs(split), config.max_pairs, config.pair_seed)
    eff = loc.fn(lm, pairs, config, precision=precision, progress=progress)
    problem = nonfinite_problem(eff, config)
    if problem is not None:  # checked before anything is written: no cache entry, no files in out_dir
        raise ConfigError(f"{method}: {problem}, so no ranking can be trusted; likely cause: the noise scale "
                          f"(noise_scale={getattr(config, 'noise_scale', None)}) or the model's dtype ({lm.dtype}). "
                          "Nothing was written")
    eff.meta.update(key=key, data=data.name, data_fingerprint=data.fingerprint, split=split)
    if target is not None:
        eff.save(target)
    if out_dir is not None:
        eff.save(out_dir)
    return eff


def nonfinite_problem(eff: HeadEffects, config) -> str | None:
    """What is not finite in a localizer's result (None: nothing): an infinite effect or standard error anywhere,
    or NaN at a head that was computed. Heads left out of `config.heads` are NaN by design, and so is every
    standard error of a single pair."""
    import torch

    L, H = eff.shape
    computed = torch.ones(L, H, dtype=torch.bool)
    if getattr(config, "heads", None) is not None and eff.method == "patching":
        from locaudit.heads import HeadSet

        computed = torch.zeros(L, H, dtype=torch.bool)
        for l, h in HeadSet.parse(config.heads, L, H).heads:
            computed[l, h] = True
    bad_eff = torch.isinf(eff.effect) | (torch.isnan(eff.effect) & computed)
    bad_se = torch.isinf(eff.se) | (torch.isnan(eff.se) & computed & (eff.n > 1))
    if not (bad_eff.any() or bad_se.any()):
        return None
    parts = []
    if bad_eff.any():
        parts.append(f"{int(bad_eff.sum())} head effect(s)")
    if bad_se.any():
        parts.append(f"{int(bad_se.sum())} standard error(s)")
    first = tuple(int(x) for x in (bad_eff | bad_se).nonzero()[0])
    return f"{' and '.join(parts)} are not finite (NaN/inf; first at L{first[0]}H{first[1]})"
