"""ITI: directions and sigma against numpy, hook == baked bias, restoration, files."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from locaudit.edit.base import load_edit
from locaudit.edit.iti import ITIEdit, fit_iti
from locaudit.errors import ConfigError, DataError
from locaudit.heads import HeadSet
from locaudit.models.tiny import tiny_model

L, H, D = 3, 4, 8
HEADS = HeadSet.from_heads([(0, 1), (2, 3), (2, 0)])


def fake_acts(n: int = 40, seed: int = 0):
    """A stand-in ActivationSet: heads [N, L, H, D], examples with label and split."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, L, H, D, generator=g)
    labels = [i % 2 for i in range(n)]
    X[torch.tensor(labels) == 1] += 0.5  # signal along every coordinate
    splits = ["train" if i < n * 3 // 4 else "val" for i in range(n)]
    examples = [{"qid": f"q{i // 2}", "text": f"t{i}", "label": labels[i], "split": splits[i]} for i in range(n)]
    return SimpleNamespace(heads=X, examples=examples, meta={"model": {"name": "tiny-llama", "fingerprint": "x"}})


def logits(lm, text="Q: What is the capital of France?\nA: Paris"):
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


def state(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def hook_count(lm):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in lm.model.modules())


def test_mass_mean_direction_and_sigma_match_numpy():
    acts = fake_acts()
    edit = fit_iti(acts, HEADS)
    X = acts.heads.numpy()
    y = np.array([e["label"] for e in acts.examples])
    train = np.array([e["split"] == "train" for e in acts.examples])
    theta = edit.theta.reshape(L, H, D).numpy()
    for l, h in HEADS:
        a = X[train, l, h, :]
        u = a[y[train] == 1].mean(0) - a[y[train] == 0].mean(0)
        u /= np.linalg.norm(u)
        sigma = np.std(a @ u)
        np.testing.assert_allclose(theta[l, h], sigma * u, rtol=1e-5, atol=1e-6)
        assert np.linalg.norm(theta[l, h]) == pytest.approx(sigma, rel=1e-5)


def test_theta_zero_outside_chosen_heads():
    edit = fit_iti(fake_acts(), HEADS)
    nz = edit.theta.reshape(L, H, D).abs().sum(-1) > 0
    assert {tuple(x) for x in torch.nonzero(nz).tolist()} == set(HEADS.heads)
    assert edit.theta.shape == (L, H * D)


def test_only_train_split_is_used():
    a, b = fake_acts(), fake_acts()
    val = torch.tensor([e["split"] == "val" for e in b.examples])
    b.heads[val] = torch.randn_like(b.heads[val]) * 100
    assert torch.equal(fit_iti(a, HEADS).theta, fit_iti(b, HEADS).theta)
    assert not torch.equal(fit_iti(a, HEADS).theta, fit_iti(b, HEADS, split=("train", "val")).theta)


def test_probe_direction_uses_probe_weight():
    acts = fake_acts()
    W = torch.randn(L, H, D)
    edit = fit_iti(acts, HEADS, direction="probe", probe=SimpleNamespace(weight=W))
    th = edit.theta.reshape(L, H, D)
    for l, h in HEADS:
        cos = torch.nn.functional.cosine_similarity(th[l, h], W[l, h], dim=0)
        assert cos == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ConfigError, match="probe"):
        fit_iti(acts, HEADS, direction="probe")
    with pytest.raises(DataError, match="shape"):
        fit_iti(acts, HEADS, direction="probe", probe=torch.randn(L, H, D + 1))
    with pytest.raises(ConfigError, match="direction"):
        fit_iti(acts, HEADS, direction="sideways")


def test_one_label_only_is_an_error():
    acts = fake_acts()
    for e in acts.examples:
        e["label"] = 1
    with pytest.raises(DataError, match="both labels"):
        fit_iti(acts, HEADS)


def random_edit(lm, heads=HEADS, alpha=3.0, seed=0):
    Lm, Hm, Dm = lm.sites.shape
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(Lm, Hm * Dm, generator=g) * heads.dim_mask(Lm, Hm, Dm)
    return ITIEdit(theta, alpha=alpha, heads=heads, n_heads=Hm)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gpt_neox", "opt", "mistral"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_hook_equals_baked_bias(family, with_bias):
    lm = tiny_model(family, with_bias=with_bias)
    edit = random_edit(lm)
    before = state(lm)
    base = logits(lm)
    with edit.applied(lm):
        hooked = logits(lm)
    with edit.baked(lm):
        baked = logits(lm)
    assert (hooked - base).abs().max() > 1e-3, "the edit must change the logits"
    assert (hooked[0, 0] - base[0, 0]).abs().max() > 1e-4, "the edit acts at the first position too"
    torch.testing.assert_close(hooked, baked, rtol=1e-4, atol=1e-5)
    after = state(lm)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert hook_count(lm) == 0
    torch.testing.assert_close(logits(lm), base, rtol=0, atol=0)


def test_zero_alpha_is_identity(tiny):
    edit = random_edit(tiny).with_alpha(0.0)
    base = logits(tiny)
    with edit.applied(tiny):
        assert torch.equal(logits(tiny), base)
    with edit.baked(tiny):
        assert torch.equal(logits(tiny), base)


def test_model_restored_after_exception(tiny):
    edit = random_edit(tiny)
    before, base = state(tiny), logits(tiny)
    for ctx in (edit.applied, edit.baked):
        with pytest.raises(RuntimeError, match="boom"):
            with ctx(tiny):
                raise RuntimeError("boom")
        assert hook_count(tiny) == 0
        after = state(tiny)
        assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(logits(tiny), base)


def test_bias_created_then_removed_on_biasless_o_proj():
    lm = tiny_model("llama")
    assert lm.sites.bias(2) is None
    with random_edit(lm).baked(lm):
        assert lm.sites.bias(2) is not None
    assert lm.sites.bias(2) is None and "bias" in lm.sites.o_proj(2)._parameters


def test_alpha_scales_linearly(tiny):
    """The o_proj output shift is alpha * W theta: doubling alpha doubles it."""
    edit = random_edit(tiny, alpha=1.0)
    outs = {}
    for a in (0.0, 1.0, 2.0):
        got = []
        with edit.with_alpha(a).applied(tiny), torch.no_grad():
            h = tiny.sites.o_proj(0).register_forward_hook(lambda m, i, o: got.append(o.detach().clone()))
            try:
                logits(tiny)
            finally:
                h.remove()
        outs[a] = got[0]
    torch.testing.assert_close(outs[2.0] - outs[0.0], 2 * (outs[1.0] - outs[0.0]), rtol=1e-4, atol=1e-5)
    W = tiny.sites.weight(0)
    torch.testing.assert_close((outs[1.0] - outs[0.0])[0, 0], W @ edit.theta[0], rtol=1e-4, atol=1e-5)


def test_bf16_model_hook_close_to_baked():
    lm = tiny_model("llama", dtype=torch.bfloat16)
    edit = random_edit(lm, alpha=1.0)
    with edit.applied(lm):
        a = logits(lm).float()
    with edit.baked(lm):
        b = logits(lm).float()
    assert (a - b).abs().max() < 0.1 * a.abs().max()


def test_save_load_roundtrip(tmp_path):
    lm = tiny_model("llama")
    edit = fit_iti(fake_acts(), HEADS, alpha=2.5)
    edit.save(tmp_path / "e")
    assert (tmp_path / "e" / "iti.safetensors").exists()
    back = load_edit(tmp_path / "e")
    assert isinstance(back, ITIEdit) and back.kind == "iti"
    assert torch.equal(back.theta, edit.theta) and back.alpha == 2.5
    assert back.heads == HEADS and back.direction == "mass_mean"
    assert back.model == {"name": "tiny-llama", "fingerprint": "x"}
    assert load_edit(tmp_path / "e", alpha=7.0).alpha == 7.0
    assert ITIEdit.load(tmp_path / "e", alpha=0.5).describe()["alpha"] == 0.5
    with edit.applied(lm):
        a = logits(lm)
    with back.applied(lm):
        assert torch.equal(logits(lm), a)


def test_heads_recovered_from_theta():
    edit = fit_iti(fake_acts(), HEADS)
    assert ITIEdit(edit.theta, n_heads=H).heads == HEADS


def test_errors(tmp_path):
    lm = tiny_model("llama")
    with pytest.raises(ConfigError, match="shape"):
        with ITIEdit(torch.zeros(2, 5)).applied(lm):
            pass
    with pytest.raises(ConfigError, match="missing"):
        ITIEdit.load(tmp_path)
    (tmp_path / "meta.json").write_text('{"kind": "lora"}')
    (tmp_path / "iti.safetensors").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="kind"):
        ITIEdit.load(tmp_path)
    (tmp_path / "meta.json").write_text('{"kind": "iti"}')
    with pytest.raises(ConfigError, match="iti.safetensors"):
        ITIEdit.load(tmp_path)
    with pytest.raises(ConfigError, match="outside"):
        fit_iti(fake_acts(), HeadSet.from_heads([(5, 0)]))
