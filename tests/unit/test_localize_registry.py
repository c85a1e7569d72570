"""Causal localizers by name (localize/registry.py): a registered one runs through localize_heads, the CLI's
method list and a study's `localizers.causal`, with no other change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from locaudit.errors import ConfigError
from locaudit.localize import registry
from locaudit.localize.effects import HeadEffects

pytestmark = pytest.mark.usefixtures("one_thread")


def column_norm(lm, pairs, config, *, precision, progress=True) -> HeadEffects:
    """A toy localizer: each head's o_proj column-block norm (no pairs needed)."""
    L, H, D = lm.sites.shape
    eff = torch.stack([lm.sites.weight(l).detach().float().cpu().reshape(-1, H, D).norm(dim=(0, 2)) for l in range(L)])
    return HeadEffects(eff, torch.zeros_like(eff), len(pairs), "colnorm", {"note": config.corruption})


@pytest.fixture
def toy():
    registry.register_causal("colnorm", f"{__name__}:column_norm")
    yield "colnorm"
    registry._REGISTRY.pop("colnorm", None)


def test_builtins_and_unknown_names() -> None:
    assert registry.causal_names()[:2] == ("patching", "attribution")
    with pytest.raises(ConfigError, match="not registered; registered: .*patching"):
        registry.causal_localizer("nope")
    with pytest.raises(ConfigError, match="identifier"):
        registry.register_causal("probe", f"{__name__}:column_norm")


def test_a_registered_localizer_runs_through_localize_heads(toy, tmp_path: Path) -> None:
    from locaudit.data.behaviour import load_behaviour
    from locaudit.localize.causal import localize_heads
    from locaudit.models.precision import resolve_precision
    from locaudit.models.tiny import tiny_model

    (tmp_path / "pairs.jsonl").write_text("".join(f'{{"prompt": "q{i}", "chosen": "a", "rejected": "b"}}\n'
                                                  for i in range(10)))
    lm = tiny_model("llama")
    data = load_behaviour(f"pairs:{tmp_path / 'pairs.jsonl'}", seed=0)
    eff = localize_heads(lm, data, method=toy, config={"max_pairs": 2, "corruption": "noise"}, split="train",
                         out_dir=tmp_path / "out",
                         precision=resolve_precision("fp32", "cpu"), cache=False)
    L, H, D = lm.sites.shape
    # independent: the norm of each head's columns of the o_proj weight, from the module itself
    W = lm.sites.o_proj(1).weight.detach().float()  # nn.Linear: [out, in] = [d_model, head*head_dim]
    assert not lm.sites.spec.conv1d
    expected = torch.stack([W[:, h * D:(h + 1) * D].norm() for h in range(H)])
    torch.testing.assert_close(eff.effect[1], expected)
    assert eff.n == 2 and eff.meta["note"] == "noise" and HeadEffects.load(tmp_path / "out").ranking() == eff.ranking()


def test_a_study_names_registered_localizers(toy, tmp_path: Path) -> None:
    from locaudit.study.spec import parse_study
    from locaudit.study.trials import expand

    (tmp_path / "tqa.csv").write_text("Type,Category,Question\n")
    base = {"name": "s", "model": {"name": "tiny:llama"}, "data": {"spec": "truthfulqa:tqa.csv"},
            "iti": {"enabled": False}, "optimal": {"localizers": ["top"]}, "evaluation": {"metrics": ["mc"]}}
    new = parse_study({**base, "localizers": {"causal": {"colnorm": {"top_k": 3}, "patching": {"max_pairs": 2}}}},
                      tmp_path, "s.yaml")
    old = parse_study({**base, "localizers": {"colnorm": {"top_k": 3}, "patching": {"max_pairs": 2}}}, tmp_path, "s.yaml")
    assert new == old and list(new.localizers.enabled_causal()) == ["patching", "colnorm"]  # the registry's order
    keys = [t.key for t in expand(new)]
    assert keys == [t.key for t in expand(old)]
    tops = {t.localizer.name for t in expand(new) if t.kind == "optimal"}
    assert tops == {"top16", "patching:top16", "colnorm:top3"}
    for bad, needle in [({"causal": {"nope": {}}}, "not a registered causal localizer"),
                        ({"colnorm": {"corruptionn": "noise"}}, "corruptionn"),
                        ({"colnorm": {}, "causal": {"colnorm": {}}}, "given twice")]:
        with pytest.raises(ConfigError, match=needle):
            parse_study({**base, "localizers": bad}, tmp_path, "s.yaml")
