"""Steps whose results other trials read: collect head activations, train the probes, build the judge."""

from __future__ import annotations

from locaudit.study.payloads import CollectTrial, JudgeTrial, LocalizeTrial, ProbeTrial
from locaudit.study.steps.context import RunContext
from locaudit.study.trials import Trial


def run_collect(ctx: RunContext, t: Trial) -> dict:
    from locaudit.localize.activations import collect_probe_activations

    p = t.as_(CollectTrial)
    out = ctx.run.collect(t.key)
    acts = collect_probe_activations(ctx.lm, ctx.data, ctx.fmt, out_dir=out, batch_size=p.batch_size,
                                     precision=ctx.precision, progress=False)  # the study's bar is the one display
    ctx.results.keep_activations(t.key, acts)
    N, L, H, D = acts.shape
    return {"metrics": {"n_examples": N, "n_layers": L, "n_heads": H, "head_dim": D},
            "artifacts": {"activations": ctx.rel(out)}}


def run_probe(ctx: RunContext, t: Trial) -> dict:
    from locaudit.localize.probe import probe_activations

    p = t.as_(ProbeTrial)
    res = probe_activations(ctx.results.activations(p.collect), l2=p.l2)
    top_k = ctx.spec.top_k_of("probe")  # a display setting (heatmap marks, the top-K mean): not in the key
    res.meta["top_k"] = top_k
    out = ctx.run.probe(t.key)
    res.save(out)
    ctx.results.keep_probe(t.key, res)
    acc = res.val_acc.flatten().double()
    k = min(top_k, acc.numel())
    return {"metrics": {"best_val_acc": float(acc.max()), "top_k_mean_val_acc": float(acc.sort(descending=True).values[:k].mean()),
                        "median_val_acc": float(acc.median()), "mean_train_acc": float(res.train_acc.double().mean())},
            "artifacts": {"probe": ctx.rel(out)}}


def run_judge(ctx: RunContext, t: Trial) -> dict:
    """Build the judge once (locaudit's default judge is trained here on first use and cached), so
    evaluation trials, in any worker, find it ready."""
    p = t.as_(JudgeTrial)
    judge = ctx.judge(p.holdout_splits)
    return {"metrics": {}, "artifacts": {"judge": str(getattr(judge, "name", p.judge))}}


def run_localize(ctx: RunContext, t: Trial) -> dict:
    """Rank every head with a causal localizer (activation or attribution patching) on the split's pairs."""
    from locaudit.localize.causal import localize_heads

    p = t.as_(LocalizeTrial)
    out = ctx.run.localize(t.key)
    eff = localize_heads(ctx.lm, ctx.data, method=p.method, config=dict(p.config), split=p.split,
                         out_dir=out, precision=ctx.precision, progress=False)  # the study's bar is the one display
    ctx.results.keep_ranking(t.key, eff.ranking())
    score = eff.score().flatten().double()
    score = score[~score.isnan()]  # heads left out of the patching set
    top = score.sort(descending=True).values[:p.top_k]
    return {"metrics": {"n_pairs": float(eff.n), "top_k_mean_score": float(top.mean()),
                        "max_score": float(score.max())},
            "artifacts": {"localize": ctx.rel(out)}}
