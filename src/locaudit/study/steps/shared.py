"""Steps whose results other trials read: collect head activations, train the probes, build the judge."""

from __future__ import annotations

from locaudit.study.steps.context import RunContext
from locaudit.study.trials import Trial


def run_collect(ctx: RunContext, t: Trial) -> dict:
    from locaudit.localize.activations import collect_probe_activations

    out = ctx.shared_dir("collect", t.key)
    acts = collect_probe_activations(ctx.lm, ctx.data, ctx.fmt, out_dir=out,
                                     batch_size=int(t.content.get("batch_size", 16)), precision=ctx.precision,
                                     progress=False)  # the study's bar is the one progress display
    ctx._acts[t.key] = acts
    N, L, H, D = acts.shape
    return {"metrics": {"n_examples": N, "n_layers": L, "n_heads": H, "head_dim": D},
            "artifacts": {"activations": ctx.rel(out)}}


def run_probe(ctx: RunContext, t: Trial) -> dict:
    from locaudit.localize.probe import probe_activations

    res = probe_activations(ctx.activations(t.content["collect"]), l2=float(t.content["l2"]))
    top_k = int(t.content.get("top_k") or ctx.spec.localizers.probe.top_k)  # a display setting (heatmap marks)
    res.meta["top_k"] = top_k
    out = ctx.shared_dir("probe", t.key)
    res.save(out)
    ctx._probes[t.key] = res
    acc = res.val_acc.flatten().double()
    k = min(top_k, acc.numel())
    return {"metrics": {"best_val_acc": float(acc.max()), "top_k_mean_val_acc": float(acc.sort(descending=True).values[:k].mean()),
                        "median_val_acc": float(acc.median()), "mean_train_acc": float(res.train_acc.double().mean())},
            "artifacts": {"probe": ctx.rel(out)}}


def run_judge(ctx: RunContext, t: Trial) -> dict:
    """Build the judge once (locaudit's default judge is trained here on first use and cached), so
    evaluation trials, in any worker, find it ready."""
    holdout = tuple(t.content.get("holdout") or (t.content["split"],))
    judge = ctx.judge(holdout)
    return {"metrics": {}, "artifacts": {"judge": str(getattr(judge, "name", t.content["judge"]))}}


def run_localize(ctx: RunContext, t: Trial) -> dict:
    """Rank every head with a causal localizer (activation or attribution patching) on the split's pairs."""
    from locaudit.localize.causal import localize_heads

    c = t.content
    out = ctx.shared_dir("localize", t.key)
    eff = localize_heads(ctx.lm, ctx.data, method=c["method"], config=dict(c["config"]), split=c["split"],
                         out_dir=out, precision=ctx.precision, progress=False)  # the study's bar is the one display
    ctx._rankings[t.key] = eff.ranking()
    k = int(c["config"].get("top_k", 16))
    score = eff.score().flatten().double()
    score = score[~score.isnan()]  # heads left out of the patching set
    top = score.sort(descending=True).values[:k]
    return {"metrics": {"n_pairs": float(eff.n), "top_k_mean_score": float(top.mean()),
                        "max_score": float(score.max())},
            "artifacts": {"localize": ctx.rel(out)}}
