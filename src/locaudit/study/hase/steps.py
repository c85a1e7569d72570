"""The steps of a Hase study: facts, causal tracing, per-layer edits (one trial per problem x method x layer).

Fact forcing (evaluate/facts.py) edits and scores the prompt with the subject's token embeddings noised as causal
tracing corrupts them: N(0, std^2) with tracing's std (noise_scale x the `noise_from` unit over the studied
facts), position 0 clean under `clean_pos0`, drawn per fact from tracing's seed. The editor trains on
`forcing_samples` draws (Hase et al.: 10 for fine-tuning, 1 for ROME / MEMIT, whose edit is nearly
deterministic); the rewrite score is read under the first draw, before and after the edit; paraphrases get their
own draw on their subject's tokens (clean where the subject does not occur); neighbour prompts (other subjects)
are not noised. Efficacy's baseline is the tracing run's most likely corrupted token (`noise_top`). Gaussian
noise always: the tracing's alternative corruptions do not apply to the edit.

Every step returns plain JSON-ready data; run.py stores it in the trial's folder.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from locaudit.data.facts import (Fact, counterfactual_targets, known_facts, load_facts, object_ids,
                                 subject_token_span)
from locaudit.edit.layer_edit import EditRow, LayerEditConfig, RowNoise, score_rows, train_layer_edits
from locaudit.edit.memit import memit_layer_edits, window_layers, window_relative_norms
from locaudit.edit.rome import key_second_moments, relative_norms, rome_layer_edits
from locaudit.errors import ConfigError
from locaudit.evaluate.facts import NEW_OBJECT_PROBLEMS, NOISED_PROBLEMS, fact_metrics
from locaudit.io import stable_hash
from locaudit.localize.tracing import TracedFact, split_half_reliability, trace_facts
from locaudit.models.precision import ResolvedPrecision
from locaudit.study.hase.spec import HaseSpec

log = logging.getLogger(__name__)


def prepare_facts(lm, spec: HaseSpec, precision: ResolvedPrecision, progress: bool = True) -> dict:
    """Load, keep the known facts, draw counterfactual objects, sample the studied facts, and pick each
    one's neighbours (same relation) and unrelated prompts (other relations), all seeded."""
    F = spec.facts
    path = spec.facts_path()
    facts = load_facts(path)
    known = known_facts(lm, facts, F.known_top_k, precision=precision, progress=progress)
    with_cf = counterfactual_targets(known, seed=F.seed, tokenizer=lm.tokenizer)
    rng = random.Random(F.seed)
    used = sorted(rng.sample(with_cf, min(len(with_cf), F.max_facts or len(with_cf))), key=lambda f: f.id)
    by_rel: dict[str, list[Fact]] = {}
    for f in known:
        by_rel.setdefault(f.relation_id, []).append(f)
    n_kl = max(spec.editing.lora.n_kl_prompts, 0)
    neighbours, unrelated = {}, {}
    for f in used:
        r = random.Random(f"{F.seed}:nb:{f.id}")
        same = [g.id for g in by_rel[f.relation_id] if g.id != f.id and g.subject != f.subject]
        neighbours[f.id] = r.sample(same, min(F.n_neighbours, len(same)))
        other = [g.id for g in known if g.relation_id != f.relation_id]
        unrelated[f.id] = r.sample(other, min(n_kl, len(other)))
    return {"counts": {"total": len(facts), "known": len(known), "with_counterfactual": len(with_cf),
                       "used": len(used)},
            "known_top_k": F.known_top_k, "source": str(path),
            "facts": [f.to_dict() for f in used], "pool": {f.id: f.to_dict() for f in known},
            "neighbours": neighbours, "unrelated": unrelated}


def run_tracing(lm, spec: HaseSpec, facts: Sequence[Fact], layers: Sequence[int], precision: ResolvedPrecision,
                progress: bool = True) -> dict:
    """Tracing effects of every fact at the edited layers, and the (layer x position) grid of the first
    `tracing.grid_facts` facts (for the heatmap)."""
    traced = trace_facts(lm, facts, spec.tracing, layers, precision=precision, progress=progress)
    return {"layers": list(layers), "window": spec.tracing.window_for(lm.sites.n_layers),
            "measure": spec.tracing.measure, "noise_from": spec.tracing.noise_from,
            "clean_pos0": spec.tracing.clean_pos0, "corruption": spec.tracing.corruption,
            "noise_scale": spec.tracing.noise_scale,
            "reliability": {k: split_half_reliability(traced, k) for k in spec.tracing.kinds},
            "position0": position0_summary(traced, spec.tracing.kinds, layers),
            "facts": {f.id: _traced_dict(lm, t) for f, t in zip(facts, traced)},
            "compare": [trace_variant(lm, spec, facts, layers, i, traced, precision, progress)
                        for i in range(len(spec.tracing.compare))]}


def trace_variant(lm, spec: HaseSpec, facts: Sequence[Fact], layers: Sequence[int], i: int, main: list[TracedFact],
                  precision: ResolvedPrecision, progress: bool = True) -> dict:
    """Tracing under compare[i]'s settings: its fields, reliability, position-0 summary and every fact's curves and
    probabilities. A variant that changes clean_pos0 alone re-traces only the facts whose subject starts at position
    0 (the others' noise and curves are the main tracing's, by construction)."""
    cfg = spec.tracing.variant(i)
    only = None
    if set(spec.tracing.compare[i]) == {"clean_pos0"}:
        only = [j for j, t in enumerate(main) if t.subject[0] == 0]
    got = trace_facts(lm, facts, cfg, layers, precision=precision, progress=progress, only=only)
    traced = [g if g is not None else m for g, m in zip(got, main)]
    return {"settings": dict(spec.tracing.compare[i]), "n_retraced": len(facts) if only is None else len(only),
            "reliability": {k: split_half_reliability(traced, k) for k in cfg.kinds},
            "position0": position0_summary(traced, cfg.kinds, layers),
            "facts": {f.id: {"effects": t.effects, "p_clean": t.p_clean, "p_corrupt": t.p_corrupt,
                             "pos0_noised": t.pos0_noised} for f, t in zip(facts, traced)}}


def position0_summary(traced, kinds, layers) -> dict:
    """How many facts had position 0 (the attention sink) noised, and the corruption and tracing peak of those
    facts beside the others (the effect of noising position 0 on this study's tracing variable)."""
    import math

    out = {"n_noised": sum(t.pos0_noised for t in traced), "n_clean": sum(not t.pos0_noised for t in traced),
           # a one-token subject at position 0 with position 0 kept clean: nothing is noised, so the fraction
           # restored is undefined (NaN) and the fact drops out of the analysis
           "n_nothing_noised": sum(not t.pos0_noised and tuple(t.subject) == (0, 1) for t in traced)}
    for flag, name in ((True, "noised"), (False, "clean")):
        g = [t for t in traced if t.pos0_noised == flag]
        drops = [t.p_clean - t.p_corrupt for t in g if not math.isnan(t.p_corrupt)]  # NaN: str found no replacement
        out[f"mean_p_drop_{name}"] = sum(drops) / len(drops) if drops else float("nan")
        for k in kinds:
            peaks = [max(v for v in (t.effects[k][l] for l in layers) if not math.isnan(v)) for t in g
                     if any(not math.isnan(t.effects[k][l]) for l in layers)]
            out[f"mean_peak_{k}_{name}"] = sum(peaks) / len(peaks) if peaks else float("nan")
    return out


def _traced_dict(lm, t: TracedFact) -> dict:
    return {"p_clean": t.p_clean, "p_corrupt": t.p_corrupt, "effects": t.effects, "subject": list(t.subject),
            "n_tokens": t.n_tokens, "noise_top": t.noise_top, "grid": t.grid, "halves": t.halves,
            "pos0_noised": t.pos0_noised}


def _target_ids(tok, f: Fact, problem: str, tracing: dict) -> list[int] | None:
    if problem == "error_injection":
        return object_ids(tok, f.new_target)
    if problem == "tracing_reversal":
        top = tracing["facts"][f.id]["noise_top"]
        return None if top < 0 or top == object_ids(tok, f.target)[0] else [int(top)]
    return object_ids(tok, f.target)


_PRE_CACHE: dict = {}


def _pre_scores(lm, rows: Sequence[EditRow], precision: ResolvedPrecision) -> torch.Tensor:
    """Unedited log-probs of score rows; they do not depend on the edited layer, so a process that runs
    several layers' trials computes them once (in-memory cache keyed by model, precision and rows)."""
    key = (lm.fingerprint, precision.key,
           tuple((tuple(r.prompt), tuple(r.completion), r.noise.tag if r.noise is not None else None) for r in rows))
    if key not in _PRE_CACHE:
        if len(_PRE_CACHE) > 64:
            _PRE_CACHE.clear()
        _PRE_CACHE[key] = score_rows(lm, rows, precision=precision)
    return _PRE_CACHE[key]


ROME_TEXT = "austen"  # the shipped generic text (evaluate/corpora/austen.txt) for ROME's C = E[k k^T]
_C_CACHE: dict = {}  # in-process: a trial's fact groups share their layer's C (the disk cache holds it across runs)


def rome_second_moments(lm, layers: Sequence[int], cfg: LayerEditConfig, precision: ResolvedPrecision
                        ) -> dict[int, torch.Tensor]:
    """ROME's key second moment at each of `layers` on the shipped Austen text (windows of at most 512 tokens,
    the first `cfg.cov_tokens` tokens), cached by content (model, layer, precision, token windows); the layers
    not cached are computed in the same passes over the text."""
    from locaudit.evaluate.texts import corpus_windows, load_corpus

    key = lambda l: (lm.fingerprint, int(l), precision.key, cfg.cov_tokens)  # noqa: E731
    todo = [int(l) for l in layers if key(l) not in _C_CACHE]
    if todo:
        max_len = min(512, int(getattr(lm.model.config, "max_position_embeddings", 512) or 512))
        windows = corpus_windows(load_corpus(ROME_TEXT), lm.tokenizer, max_length=max_len,
                                 max_tokens=cfg.cov_tokens)
        if len(_C_CACHE) + len(todo) > 12:  # memit needs its window's 5 at once
            _C_CACHE.clear()
            todo = [int(l) for l in layers]
        for l, C in key_second_moments(lm, todo, windows, precision, text_id=ROME_TEXT).items():
            _C_CACHE[key(l)] = C
    return {int(l): _C_CACHE[key(l)] for l in layers}


def rome_second_moment(lm, layer: int, cfg: LayerEditConfig, precision: ResolvedPrecision) -> torch.Tensor:
    """`rome_second_moments` of one layer."""
    return rome_second_moments(lm, [layer], cfg, precision)[int(layer)]


def forcing_noise_std(lm, spec: HaseSpec, facts: Sequence[Fact]) -> float:
    """The std of fact forcing's subject noise: tracing's (noise_scale x the unit of `tracing.noise_from`, over
    the studied facts, as trace_facts computes it)."""
    from locaudit.localize.tracing import embedding_std, subject_embedding_std

    unit = subject_embedding_std(lm, facts) if spec.tracing.noise_from == "subject" else embedding_std(lm)
    return spec.tracing.noise_scale * unit


def subject_noise(lm, spec: HaseSpec, prompt: str, subject: str, fact_id: str, n: int, std: float, what: str
                  ) -> list[RowNoise]:
    """`n` seeded draws of N(0, std^2) noise on the subject's token embeddings in `prompt` (fact forcing; causal
    tracing's corruption), position 0 left clean under tracing.clean_pos0. `what` names the prompt in the seed
    ("prompt", "para0", ...). Empty when the subject does not occur in the prompt."""
    from locaudit.errors import DataError

    try:
        s0, s1 = subject_token_span(lm.tokenizer, prompt, subject)
    except DataError:
        return []
    seed = int(stable_hash([int(spec.tracing.seed), fact_id, what], 8), 16)
    g = torch.Generator().manual_seed(seed)
    vals = torch.randn(n, s1 - s0, lm.sites.d_model, generator=g) * std
    if spec.tracing.clean_pos0 and s0 == 0:
        vals[:, 0] = 0  # the attention sink stays clean, as in tracing
    return [RowNoise(s0, vals[k], f"{seed}:{k}:{std!r}") for k in range(n)]


def _edit_group(lm, method: str, layer: int, group: list, train: list[EditRow], score: list[EditRow], problem: str,
                cfg: Any, precision: ResolvedPrecision) -> tuple[Any, torch.Tensor, dict]:
    """A group's E facts edited together at `layer` by `method` (rome, memit: the window centred on `layer`, or a
    trained edit): (edits, the score rows' log-probs after the edit, info)."""
    tok = lm.tokenizer
    if method == "rome":
        C = rome_second_moment(lm, layer, cfg, precision)
        keys = [subject_token_span(tok, f.prompt, f.subject)[1] - 1 for f, _ in group]
        return rome_layer_edits(lm, layer, train, keys, score, len(group), problem, cfg, C, precision)
    elif method == "memit":  # "at layer l": the window centred on l (Hase et al.)
        window = window_layers(layer, lm.sites.n_layers, cfg.window)
        Cs = rome_second_moments(lm, window, cfg, precision)
        keys = [subject_token_span(tok, f.prompt, f.subject)[1] - 1 for f, _ in group]
        return memit_layer_edits(lm, window, train, keys, score, len(group), problem, cfg, Cs,
                                 precision)
    else:
        return train_layer_edits(lm, layer, train, score, len(group), problem, cfg, precision)


def _pick(v: torch.Tensor, rows: dict) -> dict:
    """One fact's scores from `v` (a value per score row) by its rows' indices (`rows`: name -> index or list)."""
    d = {"true": float(v[rows["true"]])}
    for k in ("nb_true", "nb_new", "nb_target", "para_true", "para_new"):
        if k in rows and (rows[k] or not k.startswith("para")):
            d[k] = [float(v[i]) for i in rows[k]]
    if "new" in rows:
        d["new"] = float(v[rows["new"]])
    return d


def edit_at_layer(lm, spec: HaseSpec, facts_data: dict, tracing: dict, problem: str, method: str, layer: int,
                  precision: ResolvedPrecision, progress: bool = True) -> list[dict]:
    """Edit every studied fact at `layer` (E facts per group share forward passes and the frozen prefix)
    and score each edit. Returns one row per fact: metrics, the tracing effects at `layer`."""
    cfg = spec.editing.config(method).for_problem(problem)
    tok = lm.tokenizer
    pool = {k: Fact.from_dict(v) for k, v in facts_data["pool"].items()}
    facts = [Fact.from_dict(d) for d in facts_data["facts"]]
    P = lambda text: list(tok(text)["input_ids"])  # noqa: E731
    todo = [(f, t) for f in facts if (t := _target_ids(tok, f, problem, tracing)) is not None]
    noised = problem in NOISED_PROBLEMS
    if noised:
        K = cfg.noise_samples()
        if method in ("rome", "memit") and K != 1:
            raise ConfigError(f"editing.{method}.forcing_samples: {method} edits one noised prompt per fact (1); "
                              f"got {K}")
        std = forcing_noise_std(lm, spec, facts)
        draws = {f.id: subject_noise(lm, spec, f.prompt, f.subject, f.id, K, std, "prompt") for f, _ in todo}
        # a one-token subject at a clean position 0 leaves nothing to noise: no corrupted prompt, no fact forcing
        todo = [(f, t) for f, t in todo if draws[f.id] and bool(draws[f.id][0].values.abs().sum() > 0)]
    out: list[dict] = []
    groups = [todo[i: i + cfg.batch_facts] for i in range(0, len(todo), cfg.batch_facts)]
    for group in tqdm(groups, desc=f"{problem} {method} layer {layer}", disable=not progress, leave=False):
        train, score, index = [], [], []
        for e, (f, target) in enumerate(group):
            # fact forcing: the prompt with its subject noised (training: K draws; scoring: the first, as the paper
            # scores under the noise seed it trained with)
            fn = draws[f.id] if noised else [None]
            for z in fn:
                train.append(EditRow(P(f.prompt), target, e, "target", noise=z))
            if method == "lora":
                train += [EditRow(P(pool[u].prompt), [], e, "kl") for u in facts_data["unrelated"][f.id]]
            new = target if problem in NEW_OBJECT_PROBLEMS else None
            rows = {"true": len(score)}
            score.append(EditRow(P(f.prompt), object_ids(tok, f.target), e, noise=fn[0]))
            if new is not None:
                rows["new"] = len(score)
                score.append(EditRow(P(f.prompt), new, e))
            top = tracing["facts"][f.id]["noise_top"] if noised else -1
            if noised and top >= 0 and top != object_ids(tok, f.target)[0]:
                rows["new"] = len(score)  # the corrupted run's prediction: fact forcing's efficacy baseline
                score.append(EditRow(P(f.prompt), [int(top)], e, noise=fn[0]))
            rows["nb_true"], rows["nb_new"], rows["nb_target"] = [], [], []
            for nb in facts_data["neighbours"][f.id]:
                g = pool[nb]
                rows["nb_true"].append(len(score))
                score.append(EditRow(P(g.prompt), object_ids(tok, g.target), e))
                # the edit's target object on the neighbour prompt (Hase's neighbourhood score); for new-object
                # problems it is also ROME's NS row (nb_new)
                rows["nb_target"].append(len(score))
                if new is not None:
                    rows["nb_new"].append(len(score))
                score.append(EditRow(P(g.prompt), target, e))
            paras = f.meta.get("paraphrases", [])  # known_1000 has none (CounterFact has paraphrase_prompts)
            if paras:
                rows["para_true"], rows["para_new"] = [], []
                for j, q in enumerate(paras):
                    rows["para_true"].append(len(score))
                    zq = subject_noise(lm, spec, q, f.subject, f.id, 1, std, f"para{j}") if noised else []
                    score.append(EditRow(P(q), object_ids(tok, f.target), e, noise=zq[0] if zq else None))
                    if new is not None:
                        rows["para_new"].append(len(score))
                        score.append(EditRow(P(q), new, e))
            index.append(rows)
        pre = _pre_scores(lm, score, precision)
        edits, post, info = _edit_group(lm, method, layer, group, train, score, problem, cfg, precision)
        norms = window_relative_norms(lm, edits) if method == "memit" else relative_norms(lm, edits)

        for e, ((f, _), rows) in enumerate(zip(group, index)):
            m = fact_metrics(problem, _pick(pre, rows), _pick(post, rows))
            tr = tracing["facts"][f.id]
            row = {"fact": f.id, "relation_id": f.relation_id, "layer": layer, "problem": problem, "method": method,
                   **m, "loss_first": info["loss_first"], "loss_last": info["loss_last"],
                   "dw_rel_norm": norms[e]}  # ||dW||_F / ||W||_F of this fact's edit (memit: over its window)
            if method == "memit":
                row["window"] = "-".join(str(l) for l in info["layers"])
                row["residual_left"] = float(info["residual_left"][e])
            for kind, eff in tr["effects"].items():
                row[f"tracing_{kind}"] = eff[layer]
            out.append(row)
    return out
