"""`get_judge(spec)`: build a judge from its name.

  trained:DIR                 a judge trained by `locaudit judge train` (folder)
  hf:TRUTH_MODEL,INFO_MODEL   causal-LM judges (hub ids or local folders; either may be empty),
                              e.g. hf:allenai/truthfulqa-truth-judge-llama2-7B,allenai/truthfulqa-info-judge-llama2-7B
  api:MODEL@BASE_URL[#ENV]    an OpenAI-compatible chat API; key from $ENV (default OPENAI_API_KEY)
  reference[:METRIC]          TruthfulQA's BLEU/ROUGE acc (METRIC: bleu (default), rouge1, rouge2, rougeL)
  default                     locaudit's trained judge in the cache folder, trained on first use
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from locaudit.errors import ConfigError
from locaudit.evaluate.judges.base import Judge, References
from locaudit.evaluate.judges.cache import CachedJudge
from locaudit.io import cache_dir, file_sha256, stable_hash

log = logging.getLogger(__name__)

SPECS = ("trained:DIR", "hf:TRUTH_MODEL,INFO_MODEL", "api:MODEL@BASE_URL[#KEY_ENV]", "reference[:METRIC]", "default[:small]")


def _references(references: References | str | Path | None) -> References | None:
    if references is None or isinstance(references, References):
        return references
    return References.from_spec(str(references))


def judge_data_dir() -> Path | None:
    """Where TruthfulQA's finetune_{truth,info}.jsonl live: $LOCAUDIT_JUDGE_DATA, else truthfulqa/data under
    the first data root holding them (data/registry.py: $LOCAUDIT_DATA, ../shared/data, the cache that
    `locaudit data get truthfulqa` fills), else None."""
    env = os.environ.get("LOCAUDIT_JUDGE_DATA")
    if env:
        return Path(env)
    from locaudit.data.registry import locate

    found = locate("truthfulqa-judge-truth", verify=False)
    return found.path.parent if found.path is not None else None


# The default judge trains on a fixed, seeded subsample of TruthfulQA's judge data (the same judge on every
# machine): its features are SmolLM2 forward passes, ~4 GFLOP per answer, so the whole 18k-answer file
# costs ~30 min on a 2-core CPU without AMX (fp32) against ~6 min for this subsample; the held-out
# accuracy in its report.json says what the subsample costs in accuracy.
DEFAULT_TRAIN_EXAMPLES = 3000
DEFAULT_HELDOUT_EXAMPLES = 800
# `default:small` (the quickstart's judge): whole questions drawn until these many answers, so that only
# those questions' reference answers need features too (the default's uniform draw touches nearly every
# question, and references are then half its cost): ~2 min on that CPU, at some cost in held-out accuracy
# (its report.json says how much).
SIZES = {"": (DEFAULT_TRAIN_EXAMPLES, DEFAULT_HELDOUT_EXAMPLES, "pair"), "small": (1500, 400, "question")}
DEFAULT_HARD_NEGATIVES = 2  # per question (judges/hardneg.py): evasive, garbled, off-language, repetitive, copied


def _size(size: str) -> tuple[int, int, str]:
    if size not in SIZES:
        raise ConfigError(f"judge spec 'default:{size}': unknown size {size!r}; use 'default' or 'default:small'")
    return SIZES[size]


def default_judge_dir(holdout: str, holdout_splits: Sequence[str] = ("test",), seed: int = 0,
                      fractions: Sequence[float] = (0.6, 0.2, 0.2), max_questions: int | None = None,
                      model: str = "smollm2-135m-instruct", size: str = "") -> Path:
    """The cache folder of the default judge for this hold-out (keyed by the file's content and the split)."""
    n_train, n_held, cap_by = _size(size)
    csv = holdout.split(":", 1)[1] if holdout.startswith("truthfulqa:") else ""
    # max_questions does not enter: splits are drawn on the full data before any subsampling
    # (data/behaviour.py), so the judge holds out the full split and serves every subsample of it
    key = stable_hash({"holdout_file": file_sha256(csv) if csv and Path(csv).is_file() else holdout,
                       "splits": list(holdout_splits), "seed": seed, "fractions": [float(f) for f in fractions],
                       "model": model, "v": 3, "train_examples": n_train,
                       "hard_negatives": DEFAULT_HARD_NEGATIVES,
                       "heldout_examples": n_held, **({"cap_by": cap_by} if cap_by != "pair" else {})})
    return cache_dir("judges") / f"default{'-' + size if size else ''}-{key}"


def default_judge(holdout: str, holdout_splits: Sequence[str] = ("test",), seed: int = 0,
                  fractions: Sequence[float] = (0.6, 0.2, 0.2), max_questions: int | None = None,
                  model: str = "smollm2-135m-instruct", device: str = "auto", references=None, size: str = ""):
    """The default trained judge for this hold-out (`size` "" or "small"), from the cache folder; trained
    on first use."""
    from locaudit.evaluate.judges.train import JudgeTrainConfig, train_judge
    from locaudit.evaluate.judges.trained import load_trained_judge

    n_train, n_held, cap_by = _size(size)  # a bad size is named before anything is looked for
    data = judge_data_dir()
    if data is None:
        raise ConfigError("the default judge is trained on TruthfulQA's finetune_truth.jsonl / finetune_info.jsonl; "
                          "set LOCAUDIT_JUDGE_DATA to their folder, or train one with `locaudit judge train` "
                          "and pass --judge trained:DIR")
    out = default_judge_dir(holdout, holdout_splits, seed, fractions, max_questions, model, size)
    if not (out / "judge.json").is_file():
        log.warning("no default judge for this hold-out yet: training one now (once; about 5-10 min on a 2-core CPU) "
                    "into %s. Splits %s of %s (seed %d) are held out of its training.", out,
                    list(holdout_splits), holdout, seed)
        cfg = JudgeTrainConfig(kinds=["truth", "info"], model=model, truth_data=data / "finetune_truth.jsonl",
                               info_data=data / "finetune_info.jsonl", holdout=holdout,
                               holdout_splits=list(holdout_splits), seed=seed, fractions=tuple(fractions),
                               max_questions=None, device=device, max_train_examples=n_train,
                               max_heldout_examples=n_held, cap_by=cap_by,
                               hard_negatives=DEFAULT_HARD_NEGATIVES)
        train_judge(cfg, out)
    return load_trained_judge(out, references=references, device=device)


def build_judge(spec: str, *, references: References | str | Path | None = None, device: str = "auto",
                dtype: str | None = None, batch_size: int = 16, trust_remote_code: bool = False,
                holdout: str | None = None, holdout_splits: Sequence[str] = ("test",), seed: int = 0,
                fractions: Sequence[float] = (0.6, 0.2, 0.2), max_questions: int | None = None,
                rps: float = 2.0, workers: int = 4, max_retries: int = 6, timeout_s: float = 60.0,
                lm=None) -> Judge:
    """The judge named by `spec` (no cache). `lm`: an already loaded backbone for a trained judge (it must
    be unedited while the judge scores; its fingerprint is checked)."""
    kind, _, arg = str(spec).partition(":")
    kind = kind.strip().lower()
    refs = _references(references)
    if kind == "trained":
        from locaudit.evaluate.judges.trained import load_trained_judge

        if not arg:
            raise ConfigError("judge spec 'trained:': give the judge folder, e.g. trained:runs/judge")
        return load_trained_judge(arg, references=refs, device=device, lm=lm)
    if kind == "hf":
        from locaudit.evaluate.judges.hf import load_hf_judge

        truth, sep, info = arg.partition(",")
        if not sep or not (truth.strip() or info.strip()):
            raise ConfigError(f"judge spec {spec!r}: expected hf:TRUTH_MODEL,INFO_MODEL (either may be empty, "
                              "not both), e.g. hf:allenai/truthfulqa-truth-judge-llama2-7B,"
                              "allenai/truthfulqa-info-judge-llama2-7B")
        return load_hf_judge(truth.strip() or None, info.strip() or None, device=device, dtype=dtype,
                             trust_remote_code=trust_remote_code, batch_size=batch_size)
    if kind == "api":
        from locaudit.evaluate.judges.api import ApiJudge, parse_api_spec

        p = parse_api_spec(arg)
        return ApiJudge(p["model"], p["base_url"], key_env=p["key_env"], rps=rps, workers=workers,
                        max_retries=max_retries, timeout_s=timeout_s, references=refs)
    if kind == "reference":
        from locaudit.evaluate.judges.reference import ReferenceJudge

        if refs is None and holdout:
            refs = References.from_spec(holdout)
        if refs is None:
            raise ConfigError("the reference judge needs the TruthfulQA reference answers: "
                              "pass references=truthfulqa:PATH.csv (CLI: --references)")
        return ReferenceJudge(refs, arg or "bleu")
    if kind == "default":
        if not holdout:
            raise ConfigError("the default judge must know which questions to hold out of its training: "
                              "pass holdout=truthfulqa:PATH.csv (the evaluation data) and its seed/split")
        return default_judge(holdout, holdout_splits, seed, fractions, max_questions, device=device, references=refs,
                             size=arg.strip().lower())
    raise ConfigError(f"judge spec {spec!r}: unknown kind {kind!r}; use one of {', '.join(SPECS)}")


def get_judge(spec: str | Judge, cache: bool | str | Path = True, **kwargs) -> Judge:
    """Build the judge named by `spec` (see the module docstring), wrapped in the disk cache unless
    `cache=False` (`cache` may also be the cache file's path). Keyword options go to build_judge."""
    judge = spec if isinstance(spec, Judge) else build_judge(spec, **kwargs)
    if cache is False or isinstance(judge, CachedJudge):
        return judge
    return CachedJudge(judge, None if cache is True else cache)
