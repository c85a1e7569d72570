"""Judges trained by locaudit (see train.py): classifier heads on frozen-LM features plus, where the
question's TruthfulQA reference answers are known, reference-aware features.

A saved judge is a folder:
  judge.json         format, backbone model (name, fingerprint), feature layers, heads, references, report
  judge.safetensors  per head '<kind>.<variant>.<tensor>' (variant 'ref' uses the reference features,
                     'noref' is the fallback for questions without references) and 'center' [layer, d]
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from locaudit.errors import ConfigError, DataError
from locaudit.evaluate.judges.base import Judge, JudgeScore, References, check_pairs
from locaudit.evaluate.judges.features import POOLS, PairEncoder
from locaudit.evaluate.judges.heads import Head
from locaudit.evaluate.judges.reffeatures import LEXICAL, embedding_features, embedding_names, lexical_features
from locaudit.io import atomic_path, file_sha256, stable_hash, write_json_atomic
from locaudit.models.loading import LoadedModel
from locaudit.models.precision import PrecisionLike, ResolvedPrecision, as_precision

log = logging.getLogger(__name__)

FORMAT = "locaudit-trained-judge/1"
FILES = ("judge.json", "judge.safetensors")
VARIANTS = ("ref", "noref")


class JudgeFeatures:
    """Builds the feature matrices of (question, answer) pairs: `hidden` (frozen-LM states, flattened
    layer x pool x d) and `ref` (lexical + centred-cosine similarity to the question's references)."""

    def __init__(self, encoder: PairEncoder, references: References | None, center: torch.Tensor | None = None) -> None:
        self.encoder = encoder
        self.references = references
        self.center = center  # Float[Tensor, "layer d"]

    @property
    def ref_names(self) -> list[str]:
        return LEXICAL + embedding_names(self.encoder.layers)

    def hidden(self, questions: Sequence[str], answers: Sequence[str], progress: bool = True) -> torch.Tensor:
        """Float[Tensor, "N layer pool d"]."""
        return self.encoder.encode(questions, answers, progress=progress, desc="judge features (answers)")

    def ref(self, questions: Sequence[str], answers: Sequence[str], hidden: torch.Tensor,
            progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(Float[Tensor, "N R"], Bool[Tensor, "N"] has references)."""
        if self.references is None:
            return torch.zeros(len(answers), len(self.ref_names)), torch.zeros(len(answers), dtype=torch.bool)
        if self.center is None:
            raise ValueError("JudgeFeatures.ref needs the centre of the answer states (set by training)")
        lex, has = self._lexical(questions, answers, progress)
        # reference answers encoded in their question's context, once per question
        ref_q, ref_a, spans = [], [], {}
        for q in dict.fromkeys(questions):
            refs = self.references.lookup(q, with_no_comment=True)
            if refs is None:
                continue
            start = len(ref_a)
            ref_q += [q] * (len(refs[0]) + len(refs[1]))
            ref_a += list(refs[0]) + list(refs[1])
            spans[q] = (start, start + len(refs[0]), start + len(refs[0]) + len(refs[1]))
        rv = self.encoder.encode(ref_q, ref_a, progress=progress, desc="judge features (references)")[:, :, 0]
        pooled = [(rv[spans[q][0]: spans[q][1]], rv[spans[q][1]: spans[q][2]]) if q in spans else None
                  for q in questions]
        emb = embedding_features(hidden[:, :, 0], pooled, self.center)
        return torch.cat([torch.from_numpy(lex), emb], 1), torch.from_numpy(has)

    def _lexical(self, questions: Sequence[str], answers: Sequence[str], progress: bool):
        """lexical_features, cached on disk by content for large batches (training)."""
        if len(answers) < 1000 or self.encoder.db_path is None:
            return lexical_features(questions, answers, self.references, progress=progress)
        key = stable_hash({"pairs": [[q, a] for q, a in zip(questions, answers)], "refs": self.references.fingerprint,
                           "names": LEXICAL})
        path = self.encoder.db_path.parent / f"lexical-{key}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                return z["lex"], z["has"]
        lex, has = lexical_features(questions, answers, self.references, progress=progress)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, lex=lex, has=has)
        return lex, has

    def matrices(self, questions: Sequence[str], answers: Sequence[str], progress: bool = True):
        """(hidden Float[N, L*P*d], ref Float[N, R], has_ref Bool[N])."""
        h = self.hidden(questions, answers, progress)
        r, has = self.ref(questions, answers, h, progress)
        return h.reshape(len(answers), -1), r, has


def head_input(variant: str, hidden: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return torch.cat([hidden, ref], 1) if variant == "ref" else hidden


class TrainedJudge(Judge):
    """Scores with the saved heads; 'ref' heads where the question's references are known, else 'noref'."""

    def __init__(self, meta: dict, heads: dict[tuple[str, str], Head], center: torch.Tensor, lm: LoadedModel,
                 references: References | None, weights_hash: str, batch_size: int = 64,
                 path: Path | None = None, *, precision: ResolvedPrecision) -> None:
        self.meta = meta
        self.heads = heads
        self.kinds = tuple(k for k in ("truth", "info") if (k, "noref") in heads)
        enc = meta["encoder"]
        self.encoder = PairEncoder(lm, enc["layers"], batch_size=batch_size, max_length=enc["max_length"],
                                   precision=precision)
        self.features = JudgeFeatures(self.encoder, references, center)
        self.references = references
        self.path = path
        refs = f"+refs@{references.fingerprint[:10]}" if references is not None else ""
        self.name = f"trained:{weights_hash[:12]}{refs}"

    def score(self, questions: Sequence[str], answers: Sequence[str], progress: bool = False) -> list[JudgeScore]:
        check_pairs(questions, answers)
        if not questions:
            return []
        hidden, ref, has = self.features.matrices(list(questions), list(answers), progress=progress)
        probs: dict[str, list[float | None]] = {"truth": [None] * len(answers), "info": [None] * len(answers)}
        for kind in self.kinds:
            p = self.heads[(kind, "noref")].prob(head_input("noref", hidden, ref))
            if has.any() and (kind, "ref") in self.heads:
                p[has] = self.heads[(kind, "ref")].prob(head_input("ref", hidden[has], ref[has]))
            probs[kind] = p.clamp(0, 1).tolist()
        return [JudgeScore(t, i) for t, i in zip(probs["truth"], probs["info"])]

    def save(self, out_dir: str | Path) -> Path:
        return save_trained_judge(out_dir, self.meta, self.heads, self.features.center)


def save_trained_judge(out_dir: str | Path, meta: dict, heads: dict[tuple[str, str], Head],
                       center: torch.Tensor) -> Path:
    """Write judge.safetensors then judge.json (each atomically; judge.json names the weights' hash)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"center": center.float().contiguous()}
    for (kind, variant), head in heads.items():
        for k, v in head.t.items():
            tensors[f"{kind}.{variant}.{k}"] = v.float().contiguous().reshape(v.shape)
    with atomic_path(out / "judge.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    meta = dict(meta, format=FORMAT, weights_sha256=file_sha256(out / "judge.safetensors", 64),
                heads={f"{k}.{v}": h.kind for (k, v), h in heads.items()})
    write_json_atomic(out / "judge.json", meta)
    return out


def read_trained_judge(path: str | Path) -> tuple[dict, dict[tuple[str, str], Head], torch.Tensor]:
    """(meta, heads, center) from a saved judge folder; errors name the file and the missing field."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(path)
    if not d.is_dir():
        raise DataError(f"{d}: trained judge folder not found (train one with `locaudit judge train --out {d}`)")
    for f in FILES:
        if not (d / f).is_file():
            raise DataError(f"{d / f}: missing; a trained judge folder holds {' and '.join(FILES)}")
    try:
        meta = json.loads((d / "judge.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{d / 'judge.json'}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{d / 'judge.json'}: expected a JSON object")
    for fld in ("format", "model", "model_fingerprint", "encoder", "heads"):
        if fld not in meta:
            raise DataError(f"{d / 'judge.json'}: missing field {fld!r}")
    if meta["format"] != FORMAT:
        raise DataError(f"{d / 'judge.json'}: field 'format' is {meta['format']!r}, expected {FORMAT!r}")
    for fld in ("layers", "max_length"):
        if fld not in meta["encoder"]:
            raise DataError(f"{d / 'judge.json'}: missing field 'encoder.{fld}'")
    try:
        tensors = load_file(str(d / "judge.safetensors"))
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{d / 'judge.safetensors'}: unreadable ({e})") from None
    want = meta.get("weights_sha256")
    if not isinstance(want, str) or len(want) not in (16, 64):
        raise DataError(f"{d / 'judge.json'}: missing or malformed field 'weights_sha256' (got {want!r}); "
                        f"the folder cannot be checked: retrain it (`locaudit judge train --out {d}`)")
    got = file_sha256(d / "judge.safetensors", len(want))
    if got != want.lower():
        raise DataError(f"{d / 'judge.safetensors'}: sha256 {got[:16]}... differs from weights_sha256 {want[:16]}... "
                        "recorded in judge.json (weights changed, or left by an interrupted training); retrain "
                        f"(`locaudit judge train --out {d}`) or restore the folder")
    if "center" not in tensors:
        raise DataError(f"{d / 'judge.safetensors'}: missing tensor 'center'")
    heads: dict[tuple[str, str], Head] = {}
    for name in meta["heads"]:
        kind, _, variant = name.partition(".")
        if kind not in ("truth", "info") or variant not in VARIANTS:
            raise DataError(f"{d / 'judge.json'}: field 'heads' names {name!r}; expected <truth|info>.<ref|noref>")
        part = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
        try:
            heads[(kind, variant)] = Head(part)
        except KeyError as e:
            raise DataError(f"{d / 'judge.safetensors'}: head {name!r}: {e.args[0]}") from None
    for kind in {k for k, _ in heads}:
        if (kind, "noref") not in heads:
            raise DataError(f"{d / 'judge.json'}: head '{kind}.noref' is missing (every kind needs one)")
    return meta, heads, tensors["center"]


def load_trained_judge(path: str | Path, references: References | str | None = None, lm: LoadedModel | None = None,
                       device: str = "auto", batch_size: int = 64, precision: PrecisionLike = "auto") -> TrainedJudge:
    """Load a saved judge. References: given, else the TruthfulQA CSV it was trained with (if still there),
    else none (the 'noref' heads score everything, with a warning). `precision`: of the backbone's forward
    passes when scoring (auto: what this machine runs fastest; features differ from training's by rounding)."""
    from locaudit.models.loading import load_model

    d = Path(path)
    meta, heads, center = read_trained_judge(d)
    if isinstance(references, str):
        references = References.from_spec(references)
    if references is None and meta.get("references"):
        src = meta["references"].get("source")
        if src and Path(src).is_file():
            references = References.from_csv(src)
        else:
            log.warning("trained judge %s: its references %s are not available; scoring without references "
                        "(pass references=truthfulqa:PATH.csv)", d, src)
    if lm is None:
        lm = load_model(meta["model"], dtype="fp32", device=device)
    if lm.fingerprint != meta["model_fingerprint"]:
        raise ConfigError(f"{d / 'judge.json'}: trained on model {meta['model']!r} with fingerprint "
                          f"{meta['model_fingerprint']}, but the loaded model's fingerprint is {lm.fingerprint}")
    weights_hash = stable_hash({"weights": file_sha256(d / "judge.safetensors"), "encoder": meta["encoder"]})
    return TrainedJudge(meta, heads, center, lm, references, weights_hash, batch_size=batch_size, path=d,
                        precision=as_precision(precision, lm.device))


__all__ = ["POOLS", "JudgeFeatures", "TrainedJudge", "load_trained_judge", "read_trained_judge", "save_trained_judge"]
