import pytest
import torch

from locaudit.errors import ConfigError, UnsupportedModelError
from locaudit.models.hooks import o_proj_hooks
from locaudit.models.loading import resolve_dtype, resolve_model_path
from locaudit.models.scoring import score_completions
from locaudit.models.sites import ModelSites, parse_site, register_site, SITES
from locaudit.models.tiny import FAMILIES, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_shapes_and_reassembly(family):
    """o_proj(o) == W o + bias, and the per-head slices of o reassemble it exactly."""
    lm = tiny_model(family, with_bias=True)
    s = lm.sites
    assert s.shape == (3, 4, 8)
    seen = {}
    pre = {l: (lambda o, l=l: seen.__setitem__(("in", l), o.clone())) for l in range(s.n_layers)}
    post = {l: (lambda o, out, l=l: seen.__setitem__(("out", l), out.clone())) for l in range(s.n_layers)}
    ids = lm.tokenizer(["hello there", "hi"], return_tensors="pt", padding=True)
    with o_proj_hooks(s, pre=pre, post=post):
        lm.model(**ids)
    for l in range(s.n_layers):
        o, out = seen[("in", l)], seen[("out", l)]
        heads = s.split_heads(o)
        assert heads.shape[-2:] == (4, 8)
        per_head = sum(heads[..., h, :] @ s.weight(l)[:, s.head_slice(h)].T for h in range(s.n_heads))
        torch.testing.assert_close(per_head + s.bias(l), out, rtol=1e-5, atol=1e-5)


def test_hooks_are_removed_even_on_error():
    lm = tiny_model("llama")
    s = lm.sites
    with pytest.raises(RuntimeError):
        with o_proj_hooks(s, pre={0: lambda o: o * 0}):
            raise RuntimeError("boom")
    assert not s.o_proj(0)._forward_pre_hooks


def test_unsupported_family_lists_supported_and_how_to_declare():
    class Fake(torch.nn.Module):
        class config:
            model_type = "mystery"

    with pytest.raises(UnsupportedModelError) as e:
        ModelSites(Fake())
    msg = str(e.value)
    assert "llama" in msg and "gpt2" in msg and "register_site" in msg and "--site" in msg


def test_register_and_parse_site():
    spec = parse_site("layers=model.layers,o_proj=self_attn.o_proj")
    assert spec.layers == "model.layers" and not spec.conv1d
    with pytest.raises(UnsupportedModelError, match="layers="):
        parse_site("o_proj=x")
    try:
        register_site("mystery-llama", "model.layers", "self_attn.o_proj")
        assert "mystery-llama" in SITES
    finally:
        SITES.pop("mystery-llama", None)


def test_dtype_and_path_errors(tmp_path):
    assert resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(ConfigError, match="fp8"):
        resolve_dtype("fp8")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing.gguf"))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_completion_scores_match_manual_and_are_batch_invariant(family):
    lm = tiny_model(family)
    prompts = ["Q: hi\nA:", "Q: a much longer question here\nA:", "Q: x\nA:"]
    comps = [" yes it is", " no", " maybe so"]
    s4, n4 = score_completions(lm.model, lm.tokenizer, prompts, comps, batch_size=4)
    s1, n1 = score_completions(lm.model, lm.tokenizer, prompts, comps, batch_size=1)
    torch.testing.assert_close(s4, s1, rtol=1e-5, atol=1e-4)
    assert n4.tolist() == n1.tolist() == [len(c) for c in comps]  # byte-level tokenizer
    for i, (p, c) in enumerate(zip(prompts, comps)):
        ids = lm.tokenizer(p + c, return_tensors="pt").input_ids
        with torch.no_grad():
            lp = torch.log_softmax(lm.model(ids).logits[0, :-1].float(), -1)
        tok = lp.gather(1, ids[0, 1:, None])[:, 0]
        plen = len(lm.tokenizer(p).input_ids)
        torch.testing.assert_close(s1[i], tok[plen - 1:].sum(), rtol=1e-5, atol=1e-4)
