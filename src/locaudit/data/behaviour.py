"""BehaviourData: one behaviour dataset with its question-level split, ready for probing, editing and eval.

Specs for `load_behaviour`:
- `truthfulqa:PATH.csv`  TruthfulQA CSV (v1 or Jan-2025); mc_task.json found beside it (data/v1/) or,
                         for the Jan-2025 CSV at the repository root, in data/; or pass mc_path.
- `truthfulqa`           the HF hub copy (needs `datasets` and network or its cache).
- `caa:NAME_OR_PATH`     a CAA A/B dataset (chosen = matching behaviour).
- `pairs:PATH`           a generic JSONL/JSON/CSV file of prompt, chosen, rejected (optional qid).
- `pairs:hf:ID[@CONFIG][:SPLIT]` the same fields from a datasets-hub id (split default train; needs `datasets`
                        and the hub or its cache), e.g. `pairs:hf:OWNER/NAME:test`.
For pair datasets, a "question" is a prompt: its correct answers are its chosen answers and its
incorrect answers its rejected ones, so generation, evaluation and probing work the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from locaudit.data.caa import load_caa
from locaudit.data.pairs import load_pairs, preference_pairs
from locaudit.data.probing import probe_examples as _probe_examples
from locaudit.data.splits import check_fractions, split_questions, subsample_questions
from locaudit.data.truthfulqa import find_mc_file, load_mc, load_mc_hub, load_truthfulqa
from locaudit.data.types import SPLITS, MCItem, PreferencePair, ProbeExample, Question
from locaudit.errors import ConfigError, DataError
from locaudit.io import stable_hash


@dataclass(frozen=True, eq=False)
class BehaviourData:
    """Questions, pairs and MC items of one behaviour, each question in exactly one split."""

    name: str
    split_of: dict[str, str]  # qid -> "train" | "val" | "test"
    all_questions: tuple[Question, ...]
    all_pairs: tuple[PreferencePair, ...]
    all_mc: tuple[MCItem, ...] = ()
    seed: int = 0
    source: dict = field(default_factory=dict)  # how it was loaded (spec, files), for meta.json
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        missing = [q.qid for q in self.all_questions if q.qid not in self.split_of]
        if missing:
            raise DataError(f"BehaviourData {self.name!r}: questions without a split: {missing[:3]}")
        bad = {s for s in self.split_of.values() if s not in SPLITS}
        if bad:
            raise DataError(f"BehaviourData {self.name!r}: unknown split name(s) {sorted(bad)}; expected {SPLITS}")
        content = {
            "questions": [q.__dict__ for q in self.all_questions],
            "pairs": [p.__dict__ for p in self.all_pairs],
            "mc": [m.__dict__ for m in self.all_mc],
            "split_of": self.split_of,
            "seed": self.seed,
        }
        object.__setattr__(self, "fingerprint", stable_hash(content))

    def _check(self, split: str | None) -> None:
        if split is not None and split not in SPLITS:
            raise ConfigError(f"split {split!r} is not one of {SPLITS}")

    def questions(self, split: str | None = None) -> list[Question]:
        """The questions of `split` (all with None), in the dataset's order."""
        self._check(split)
        return [q for q in self.all_questions if split is None or self.split_of[q.qid] == split]

    def pairs(self, split: str | None = None) -> list[PreferencePair]:
        """The preference pairs of the questions in `split`."""
        self._check(split)
        return [p for p in self.all_pairs if split is None or self.split_of[p.qid] == split]

    def probe_examples(self, split: str | None = None) -> list[ProbeExample]:
        """ITI probe examples (random question from the same split); all splits with None."""
        self._check(split)
        examples = _probe_examples(self.all_questions, self.split_of, seed=self.seed)
        return [e for e in examples if split is None or e.split == split]

    def mc_items(self, split: str | None = None) -> list[MCItem]:
        """MC items of the questions in `split` (empty for datasets without MC targets)."""
        self._check(split)
        return [m for m in self.all_mc if m.qid in self.split_of and (split is None or self.split_of[m.qid] == split)]

    def summary(self) -> dict:
        """Counts per split, for logs and meta.json."""
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            **{
                s: {"questions": len(self.questions(s)), "pairs": len(self.pairs(s)), "mc": len(self.mc_items(s))}
                for s in SPLITS
            },
        }


def questions_from_pairs(pairs: Sequence[PreferencePair]) -> list[Question]:
    """One Question per qid: correct = its chosen answers, incorrect = its rejected ones (first-seen order)."""
    groups: dict[str, list[PreferencePair]] = {}
    for p in pairs:
        groups.setdefault(p.qid, []).append(p)
    out = []
    for qid, ps in groups.items():
        prompts = {p.question for p in ps}
        if len(prompts) > 1:
            raise DataError(f"pairs with qid {qid!r} have different prompts: {sorted(prompts)[:2]}")
        chosen = tuple(dict.fromkeys(p.chosen for p in ps))
        out.append(
            Question(
                qid=qid,
                question=ps[0].question,
                best_answer=chosen[0],
                correct=chosen,
                incorrect=tuple(dict.fromkeys(p.rejected for p in ps)),
            )
        )
    return out


def build_behaviour(
    name: str,
    questions: list[Question],
    pairs: list[PreferencePair] | None,
    mc: list[MCItem],
    seed: int,
    fractions: Sequence[float],
    max_questions: int | None,
    source: dict,
) -> BehaviourData:
    splits = split_questions(questions, fractions, seed)
    if max_questions is not None and max_questions < len(questions):
        # split first, then subsample each split in proportion: a small run's test questions are always
        # test questions of the full data, so a judge that holds out the full test split stays leak-free
        n_total = len(questions)
        splits = {s: subsample_questions(qs, max(1, round(max_questions * len(qs) / n_total)) if qs else None, seed)
                  for s, qs in splits.items()}
        keep = {q.qid for qs in splits.values() for q in qs}
        questions = [q for q in questions if q.qid in keep]
    split_of = {q.qid: s for s, qs in splits.items() for q in qs}
    if pairs is None:
        pairs = preference_pairs(questions)
    else:
        pairs = [p for p in pairs if p.qid in split_of]
    known = {q.qid for q in questions}
    if mc and max_questions is None:
        unmatched = [m for m in mc if m.qid not in known]
        if unmatched:
            warnings.warn(
                f"{len(unmatched)} of {len(mc)} MC items match no question of {name!r} (different TruthfulQA "
                f"version?), e.g. {unmatched[0].question!r}; they are left out",
                stacklevel=3,
            )
    mc = [m for m in mc if m.qid in known]
    source = {**source, "seed": seed, "fractions": list(fractions), "max_questions": max_questions}
    return BehaviourData(
        name=name,
        split_of=split_of,
        all_questions=tuple(questions),
        all_pairs=tuple(pairs),
        all_mc=tuple(mc),
        seed=seed,
        source=source,
    )


def load_behaviour(
    spec: str,
    seed: int = 0,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    mc_path: str | Path | None = None,
    max_questions: int | None = None,
) -> BehaviourData:
    """Load a behaviour dataset from a spec (see the module docstring) and split it by question.

    `max_questions` keeps a seeded subset of each split (in proportion, so small runs stay 60/20/20) AFTER
    splitting the full data: the questions of a split are always questions of that split of the full data.
    """
    check_fractions(fractions)
    if max_questions is not None and max_questions < 1:
        raise ConfigError(f"max_questions={max_questions}: must be >= 1")
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "truthfulqa":
        if arg:
            csv_path = Path(arg)
            questions = load_truthfulqa(csv_path)
            mc_file = Path(mc_path) if mc_path is not None else find_mc_file(csv_path)
            mc = load_mc(mc_file) if mc_file is not None else []
            source = {"spec": spec, "csv": str(csv_path), "mc": str(mc_file) if mc_file else None}
            version = csv_path.parent.name if csv_path.parent.name in ("v0", "v1") else None
            version = version or ("2025" if any(q.best_incorrect for q in questions) else csv_path.stem.lower())
            name = f"truthfulqa-{version}"
        else:
            questions = load_truthfulqa(hub=True)
            mc = load_mc(mc_path) if mc_path is not None else load_mc_hub()
            source = {"spec": spec, "hub": "truthfulqa/truthful_qa", "mc": str(mc_path) if mc_path else "hub"}
            name = "truthfulqa-hub"
        return build_behaviour(name, questions, None, mc, seed, fractions, max_questions, source)
    if kind in ("caa", "pairs"):
        if not arg:
            raise ConfigError(f"spec {spec!r}: give a name or path after '{kind}:'")
        if kind == "pairs" and arg.startswith("hf:"):
            from locaudit.data.pairs import load_pairs_hub

            pairs = load_pairs_hub(arg[3:])
        else:
            pairs = load_caa(arg) if kind == "caa" else load_pairs(arg)
        mc = load_mc(mc_path) if mc_path is not None else []
        name = f"{kind}-{Path(arg).stem if Path(arg).suffix else arg.replace('/', '-')}"
        return build_behaviour(name, questions_from_pairs(pairs), pairs, mc, seed, fractions, max_questions,
                               {"spec": spec})
    raise ConfigError(
        f"behaviour spec {spec!r}: unknown kind {kind!r}; "
        "use truthfulqa:PATH.csv, truthfulqa (the hub's truthfulqa/truthful_qa), caa:NAME_OR_PATH, pairs:PATH or "
        "pairs:hf:OWNER/NAME[@CONFIG][:SPLIT] (a datasets-hub id)"
    )
