"""Per-layer fact edits: only the edited layer's weight changes, the toy fact reaches its new object, the
frozen-prefix + per-row hook path equals the baked weight in a full forward, and edits trained together
equal edits trained alone."""

from __future__ import annotations

import pytest
import torch

from locaudit.edit.layer_edit import EditRow, LayerEditConfig, score_rows, site_module, train_layer_edits
from locaudit.models.precision import resolve_precision as _P  # resolved once, as entry points do


def _rows(lm):
    tok = lm.tokenizer
    P = lambda s: tok(s)["input_ids"]  # noqa: E731
    C = lambda s: tok(" " + s, add_special_tokens=False)["input_ids"]  # noqa: E731
    train = [EditRow(P("Paris is in"), C("Zq"), 0, "target"), EditRow(P("Rome is in"), C("Xy"), 1, "target"),
             EditRow(P("Oslo has"), [], 0, "kl"), EditRow(P("Bern has"), [], 1, "kl")]
    score = [EditRow(P("Paris is in"), C("Zq"), 0), EditRow(P("Paris is in"), C("France"), 0),
             EditRow(P("Rome is in"), C("Xy"), 1), EditRow(P("Oslo is in"), C("Xy"), 0)]
    return train, score


CFG = {"ft": dict(method="ft", steps=30, lr=0.05, norm_bound=0.1),
       "lora": dict(method="lora", steps=30, lr=0.1, kl_weight=0.5, n_kl_prompts=1)}


@pytest.mark.parametrize("family, method, site", [
    ("llama", "ft", "mlp_down"), ("llama", "lora", "mlp_down"), ("llama", "ft", "o_proj"), ("llama", "lora", "o_proj"),
    ("gpt_neox", "ft", "mlp_down"), ("gpt_neox", "lora", "o_proj"), ("qwen2", "ft", "mlp_down")])
def test_edit_reaches_new_object_and_touches_only_its_layer(family, method, site):
    from locaudit.models.tiny import tiny_model

    lm = tiny_model(family, n_layers=3)
    train, score = _rows(lm)
    train = train if method == "lora" else train[:2]
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    pre = score_rows(lm, score, precision=_P('fp32'))
    for layer in (0, 2):
        cfg = LayerEditConfig(site=site, **CFG[method])
        edits, post, info = train_layer_edits(lm, layer, train, score, 2, "error_injection", cfg, precision=_P('fp32'))
        assert info["frozen_prefix"] == (layer > 0)
        assert post[0] > pre[0] + 2.0 and post[2] > pre[2] + 2.0  # the new objects became much more likely
        assert post[0] > post[1]  # efficacy on the toy fact: p_new > p_old
        if method == "ft":
            assert float(edits.dw.abs().max()) <= cfg.norm_bound + 1e-7
        target = site_module(lm, site, layer).weight
        for e in (0, 1):
            with edits.applied(lm, e):
                changed = [n for n, p in lm.model.named_parameters() if not torch.equal(p, before[n])]
                assert len(changed) == 1 and lm.model.get_parameter(changed[0]) is target
                # the baked weight in a full forward equals the hook on the frozen prefix
                full = score_rows(lm, [r for r in score if r.edit == e], precision=_P('fp32'))
            assert torch.allclose(full, post[[i for i, r in enumerate(score) if r.edit == e]], atol=1e-4)
        assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())  # restored exactly


def test_edits_trained_together_equal_edits_trained_alone():
    from locaudit.models.tiny import tiny_model

    lm = tiny_model("llama", n_layers=3)
    train, score = _rows(lm)
    cfg = LayerEditConfig(**CFG["ft"])
    together, post, _ = train_layer_edits(lm, 1, train[:2], score, 2, "error_injection", cfg, precision=_P('fp32'))
    for e in (0, 1):
        alone, post_e, _ = train_layer_edits(
            lm, 1, [EditRow(train[e].prompt, train[e].completion, 0, "target")],
            [EditRow(r.prompt, r.completion, 0) for r in score if r.edit == e], 1, "error_injection", cfg, precision=_P('fp32'))
        # equal up to float accumulation order (a batch of 2 vs 1 rows; the thread count changes it too).
        # Adam divides each element's step by that element's own gradient scale, so an element whose gradient
        # sits at rounding level can move by a visible fraction of lr: measured on an AVX2 CPU, one of 2048
        # elements differs by 1.2e-5 (1.2e-4 of the norm bound). Hence: the whole update within 1e-4 of its
        # norm, and no element further than 1e-3 of the norm bound after 30 Adam steps
        diff = alone.dw[0] - together.dw[e]
        assert diff.norm() <= 1e-4 * together.dw[e].norm()
        assert diff.abs().max() <= 1e-3 * cfg.norm_bound
        assert torch.allclose(post_e, post[[i for i, r in enumerate(score) if r.edit == e]], atol=1e-4)


def test_erasure_and_amplification_move_the_true_object():
    from locaudit.models.tiny import tiny_model

    lm = tiny_model("llama", n_layers=2)
    tok = lm.tokenizer
    rows = [EditRow(tok("Paris is in")["input_ids"], tok(" Fr", add_special_tokens=False)["input_ids"], 0, "target")]
    score = [EditRow(r.prompt, r.completion, 0) for r in rows]
    pre = score_rows(lm, score, precision=_P('fp32'))
    cfg = LayerEditConfig(**CFG["ft"])
    _, up, _ = train_layer_edits(lm, 1, rows, score, 1, "fact_amplification", cfg, precision=_P('fp32'))
    _, down, _ = train_layer_edits(lm, 1, rows, score, 1, "fact_erasure", cfg, precision=_P('fp32'))
    assert up[0] > pre[0] and down[0] < pre[0]


def test_summed_nll_and_per_edit_early_stopping():
    """nll: sum gives each edit its summed target NLL (mean x tokens); with early_stop, an edit whose loss is
    below the bound stops changing while the others go on, and the loop ends once every edit has stopped."""
    from locaudit.models.tiny import tiny_model

    lm = tiny_model("llama", n_layers=3)
    train, score = _rows(lm)
    P = _P("fp32")
    base = dict(method="ft", steps=4, lr=0.05, norm_bound=0.1)
    _, _, mean = train_layer_edits(lm, 1, train[:2], score, 2, "error_injection", LayerEditConfig(**base), P)
    _, _, summed = train_layer_edits(lm, 1, train[:2], score, 2, "error_injection",
                                     LayerEditConfig(**base, nll="sum"), P)
    lens = [len(r.completion) for r in train[:2]]
    pre = score_rows(lm, train[:2], precision=P)
    assert mean["loss_first"] == pytest.approx(float((-pre / torch.tensor(lens, dtype=torch.float)).mean()), rel=1e-4)
    assert summed["loss_first"] == pytest.approx(float((-pre).mean()), rel=1e-4)
    # edit 1's target is already likely (its own prompt's greedy continuation): its loss starts below the bound
    greedy = [int(lm.model(input_ids=torch.tensor([train[1].prompt])).logits[0, -1].argmax())]
    rows = [train[0], EditRow(train[1].prompt, greedy, 1, "target")]
    lp1 = float(score_rows(lm, rows[1:], precision=P)[0])
    stop = -lp1 * 1.5  # above edit 1's loss, far below edit 0's
    assert stop < float(-score_rows(lm, rows[:1], precision=P)[0])
    edits, _, info = train_layer_edits(lm, 1, rows, score, 2, "error_injection",
                                       LayerEditConfig(**base, early_stop=stop), P)
    assert float(edits.dw[1].abs().max()) == 0.0 and float(edits.dw[0].abs().max()) > 0
    # a bound above every loss stops everything before the first step
    edits, _, info = train_layer_edits(lm, 1, rows, score, 2, "error_injection",
                                       LayerEditConfig(**base, early_stop=1e6), P)
    assert float(edits.dw.abs().max()) == 0.0 and info["loss_first"] == info["loss_last"]
