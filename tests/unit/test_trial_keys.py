"""Trial keys are content hashes that finished runs are found by: a change to how trials are built must never move
a key whose content is unchanged. The keys below were computed before trial contents became typed payloads
(study/payloads.py); each study covers every trial kind and the optional fields (causal rankings, dose steps,
selection with a judge hold-out)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from locaudit.io import stable_hash
from locaudit.study.payloads import OptimalTrial
from locaudit.study.spec import parse_study
from locaudit.study.trials import Trial, expand, make_trial

STUDIES = {
    "plain": {
        "name": "keys-plain",
        "model": {"name": "tiny:llama"},
        "data": {"spec": "truthfulqa:tqa.csv", "max_questions": 20},
        "localizers": {"probe": {"top_k": 4}, "random": {"n": 2}, "single": {"n": 1}},
        "iti": {"alphas": [1.0, 5.0]},
        "optimal": {"taus": [0.1]},
        "evaluation": {"metrics": ["mc", "kl"]},
    },
    "full": {
        "name": "keys-full",
        "model": {"name": "tiny:gpt2", "dtype": "bf16"},
        "precision": "fp32",
        "data": {"spec": "truthfulqa:tqa.csv", "mc_path": "mc.json", "seed": 3, "format": "chat"},
        "localizers": {"probe": {"top_k": 2, "l2": 0.5}, "random": {"n": 2, "max_overlap": None},
                       "single": {"n": 1, "top": 1, "heads": ["L0H1"]},
                       "patching": {"top_k": 3, "corruption": "noise", "max_pairs": 2},
                       "attribution": {"max_pairs": 4}},
        "iti": {"alphas": [2.0, 4.0], "direction": "probe", "localizers": ["top", "random"]},
        "optimal": {"taus": [0.1, 0.2], "lr": {"top": [5e-4, 1e-3]}, "epochs": 1, "max_train_pairs": 8,
                    "train_options": {"warmup_ratio": 0.1}, "seeds": [0, 1], "dose_steps": [0.5, 2]},
        "evaluation": {"metrics": ["mc", "kl", "gen"], "judge": "default:small", "max_questions": 3,
                       "max_new_tokens": 6, "selection": "validation"},
        "verdict": {"primary_metric": "true_info"},
    },
}

# (kind, key) of every trial of each study, in expansion order: computed before the typed payloads, but for the
# localize trials and the trials that read their rankings (ITI and optimal with a ranking_trial, and their select
# trials), re-keyed when localize trials came to hold the localizer's whole resolved config and its VERSION
PINNED: dict[str, list[tuple[str, str]]] = {
    'plain': [
        ('collect', '3d8ace723eebfe87'), ('probe', '631866085e0db99a'), ('baseline', '23fb6a417cff5535'),
        ('iti', 'b19067895d283486'), ('select', '74f26286838896e2'), ('iti', '061cde528e3fda3f'),
        ('select', '03f9fa1a421b6327'), ('iti', 'ece56b9e82c21faf'), ('select', 'e44752b178139f1e'),
        ('iti', 'dcc133502a8cfeac'), ('select', '8ad0e99d05971683'), ('iti', '277bc2945fdf1f1b'),
        ('select', '4cca3e54a350eee6'), ('iti', '970080612671a921'), ('select', 'fe97ced470af75d9'),
        ('optimal', '3d6e4eac7a91029c'), ('optimal', '706ead3a283aabb5'), ('optimal', '4b60dfa2ca922519'),
        ('optimal', '2fa9714bae8ac53e'), ('optimal', '34a48b6f01899c4f'),
    ],
    'full': [
        ('collect', 'c61674d847cb3808'), ('probe', 'f5d897b587fb77f7'), ('localize', 'a78db5cba8228442'),
        ('localize', '406ce47e2bc3edf2'), ('judge', '0fffd4e1cdecaa9e'), ('baseline', '4a84298dd291428e'),
        ('iti', 'd1c4dc401d385abb'), ('select', 'ff80ea534b737bdc'), ('iti', 'a8444faefd742427'),
        ('select', 'd531de488d654a5b'), ('iti', 'd223658966628860'), ('select', '6f11970b003a5df8'),
        ('iti', '6cc8febd80460ce6'), ('select', 'a55d70b537f987d2'), ('iti', '5e7ad2adf58e2b1e'),
        ('select', 'f146b32ff0059624'), ('iti', 'b40d14d74df75aed'), ('select', '10aec194b8e4e53e'),
        ('iti', '81fb1ee49ccb4827'), ('select', '5c3e2f3788c22bfe'), ('iti', '2d92f10f5824d838'),
        ('select', '43379e7155c0a4d4'), ('iti', '950f3849391090d1'), ('select', '705dffb8e8c9411c'),
        ('iti', '27c8ba8a42c697eb'), ('select', '55fe453dba9cb7b7'), ('optimal', '99b948b2548640dc'),
        ('select', '6f79c99a73307e02'), ('optimal', '22e8ee1fd2e799d9'), ('select', 'd009f383b86313be'),
        ('optimal', 'ce3406e75b6e32cf'), ('select', '60925a9eb5a57a0c'), ('optimal', '5b77d11756066cce'),
        ('select', 'ef15839fdf9cc9f7'), ('optimal', 'c9bbcaf337a3f5ea'), ('select', 'f0c18b25e5940bc2'),
        ('optimal', '9a78de211e4eb223'), ('select', 'f2319461f82141c5'), ('optimal', 'c8466d13ad7b0aab'),
        ('select', '548008b24f00e0da'), ('optimal', '32d4921f92a7a96b'), ('select', 'a88e60e37c3bd2d4'),
        ('optimal', '39cb617072caadbf'), ('select', 'c5ebd0d193af8d4a'), ('optimal', 'c41538fc978452fd'),
        ('select', 'c479786a20e08a0a'), ('optimal', 'cdc393c55264268a'), ('select', '9e9247caa9223cd4'),
        ('optimal', '721ea8f6a19108d7'), ('select', '13ed1839c725ab06'), ('optimal', '9b6a759f23975c34'),
        ('select', '5f6f3ec09b47c581'), ('optimal', 'ec41b8fc48babee8'), ('select', 'b90844de3de9060f'),
        ('optimal', '5972ae7d13027c11'), ('select', '2b03df9fad7a2715'), ('optimal', 'c92714b9a7150cad'),
        ('select', '16851b0ed22c7185'), ('optimal', '75a65eb25f7787ba'), ('select', 'c317e8d5c2bae1c5'),
        ('optimal', '70df5d658806debb'), ('select', '2299b1529f377c2f'), ('optimal', '6259cbe3506a8106'),
        ('select', 'f367998d73924d21'), ('optimal', 'c3a3597804878755'), ('select', 'feb30a03df532ae6'),
        ('optimal', '9224b31e36e704de'), ('select', '0c046bad50b4bf2e'), ('optimal', 'fc5caf75704d5057'),
        ('select', '53caeffa5b1df5cc'), ('optimal', 'a86cf5dd53d89089'), ('select', 'd6167fb990e60ca0'),
        ('optimal', 'e1aa1ea5cfe9f7cb'), ('select', '40808a368a66f902'), ('optimal', '4dd2c61e42c3437b'),
        ('select', 'c1ea28cb2efb38f8'), ('optimal', '8da0a82a4697dc1c'), ('select', '33d792d6ccdc4bbd'),
        ('optimal', '6826dcde52e65212'), ('select', '1cbdd02cbaf7d662'), ('optimal', '4f1c5e6716c57157'),
        ('select', 'e661d7923900ea53'), ('optimal', '146ec69b2d95bdde'), ('select', '9bc5f1d10f4c7e70'),
        ('optimal', 'aff70d54037c470d'), ('select', '73aa46f612b924fb'), ('optimal', '991c22942ecb3c73'),
        ('select', 'dfaec77acf23753b'), ('optimal', 'b81006c96cd50c48'), ('select', '6be77a6e429e6d26'),
        ('optimal', 'f3ec325a2301d0c0'), ('select', '0e46124dd30c4e8a'), ('optimal', 'fb9083e2d77628c4'),
        ('select', '2def86fd5c39806a'), ('optimal', 'ac0c78c8e60d59a8'), ('select', '3cb576cbc50f7538'),
        ('optimal', '642e4eb4d26cf1be'), ('select', '1b25d5ef2a7505a9'), ('optimal', '0cb5a9960ddaeb0a'),
        ('select', '5d1d26757d14ce7e'), ('optimal', '7c5b1a4c38ea1323'), ('select', 'a477139c5bc03abb'),
        ('optimal', '62e5edd2056c594e'), ('select', '9c38d7deba499b0e'), ('optimal', 'ebe2f62e9ebf59d2'),
        ('select', '97fb8db4fab5c34b'), ('optimal', 'ec547e2ba68a02b0'), ('select', '19273bba1b160469'),
        ('optimal', '28ec902d5b5cac03'), ('select', 'ca2420a4c24f6ceb'), ('optimal', '2cff604e1d3fd105'),
        ('select', '7376401fb0c55b53'), ('optimal', '775498b79ec47bd0'), ('select', '14ca80e8f9edcecb'),
        ('optimal', '495369fc08a68a5b'), ('select', '69a4e6bbd53bca50'), ('optimal', 'f52e385013441544'),
        ('select', 'a3f60897fdcaed99'), ('optimal', '2db9b8fba4c33072'), ('select', '0f3b790615282372'),
        ('optimal', '07fa4155d40c2614'), ('select', '55d3f2dedf02ec53'),
    ],
}


def write_data(folder: Path) -> Path:
    """The studies' data files (keys hash their content, not their place)."""
    (folder / "tqa.csv").write_text("Type,Category,Question,Best Answer\nA,B,Is it?,Yes\n")
    (folder / "mc.json").write_text('[{"question": "Is it?", "mc1_targets": {"Yes": 1, "No": 0}}]')
    return folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_data(tmp_path)


def _trials(folder: Path, name: str) -> list[Trial]:
    return expand(parse_study(copy.deepcopy(STUDIES[name]), folder, f"{name}.yaml"))


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_keys_are_unchanged(folder: Path, name: str) -> None:
    got = [(t.kind, t.key) for t in _trials(folder, name)]
    assert got == [tuple(x) for x in PINNED[name]]


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_payload_dump_is_the_hashed_content(folder: Path, name: str) -> None:
    trials = _trials(folder, name)
    assert {t.kind for t in trials} >= {"collect", "probe", "baseline", "iti", "optimal"}
    for t in trials:
        again = Trial.from_dict(t.to_dict())  # as a ledger row reads it back
        assert again.payload == t.payload and again.payload.content() == t.content, t.name
        assert t.key == stable_hash(t.content) == make_trial(t.kind, {k: v for k, v in t.content.items()
                                                                    if k != "kind"}).key


def test_full_study_has_every_optional_field(folder: Path) -> None:
    """The pinned 'full' study exercises what is left out of contents when unset (so the pins cover it)."""
    trials = _trials(folder, "full")
    kinds = {t.kind for t in trials}
    assert kinds == {"collect", "probe", "localize", "judge", "baseline", "iti", "optimal", "select"}
    opt = [t for t in trials if t.kind == "optimal"]
    assert all("dose_steps" in t.content for t in opt)
    assert any("ranking_trial" in t.content for t in opt) and any("ranking_trial" not in t.content for t in opt)
    assert all(t.content["evaluation"]["judge_holdout"] == ["test", "val"] for t in opt)
    judge = next(t for t in trials if t.kind == "judge")
    assert judge.content["holdout"] == ["test", "val"]
    plain = _trials(folder, "plain")
    assert not any("dose_steps" in t.content or "ranking_trial" in t.content for t in plain)
    assert not any("judge_holdout" in (t.content.get("evaluation") or {}) for t in plain)


def test_a_changed_field_changes_the_key(folder: Path) -> None:
    t = next(t for t in _trials(folder, "plain") if t.kind == "optimal")
    p = t.payload
    assert p.model_copy(update={"lr": p.lr * 2}).key() != t.key
    assert p.model_copy(update={"evaluation": p.evaluation.model_copy(update={"max_questions": 7})}).key() != t.key
    assert p.model_copy().key() == t.key


def test_bad_content_names_the_field(folder: Path) -> None:
    from locaudit.errors import ConfigError

    iti = next(t for t in _trials(folder, "plain") if t.kind == "iti")
    t = Trial(iti.key, "iti", {**iti.content, "alpha": "strong"})
    with pytest.raises(ConfigError, match="ITITrial: alpha: Input should be a valid number"):
        t.payload
    with pytest.raises(ConfigError, match="not OptimalTrial"):
        iti.as_(OptimalTrial)
    with pytest.raises(ConfigError, match="no payload model"):
        Trial("k", "nope", {}).payload


def test_localize_key_holds_the_resolved_config_and_version(folder: Path) -> None:
    """A localize trial holds every field of its localizer's config, defaults included, and its VERSION."""
    from locaudit.localize.corruptions import PatchingConfig
    from locaudit.localize.patching import VERSION

    loc = [t for t in _trials(folder, "full") if t.kind == "localize"]
    assert [t.content["method"] for t in loc] == ["patching", "attribution"]
    for t in loc:
        assert set(t.content["config"]) == set(PatchingConfig().model_dump())  # qk_fix only when on: old keys hold
        assert t.content["version"] == VERSION
    assert loc[0].content["config"]["positions"] == "completion"  # a default the study file leaves unset
    assert loc[0].content["config"]["corruption"] == "noise" and loc[0].content["config"]["top_k"] == 3


def _changed(before: list[Trial], after: list[Trial]) -> set[str]:
    """Keys (of `before`) that differ in `after` (the two expansions list the same trials in order)."""
    assert [t.kind for t in before] == [t.kind for t in after]
    return {b.key for b, a in zip(before, after) if a.key != b.key}


def _rekeyed(trials: list[Trial], methods: set[str]) -> set[str]:
    """The keys a re-keyed localize trial of `methods` moves: itself, the trials reading its ranking, their selects."""
    loc = {t.key for t in trials if t.kind == "localize" and t.content["method"] in methods}
    ranked = {t.key for t in trials if t.content.get("ranking_trial") in loc}
    return loc | ranked | {t.key for t in trials if t.kind == "select" and t.content["of"] in ranked}


def test_a_changed_default_changes_the_localize_key(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A study file leaving `positions` unset gets new localize keys (and new keys for the trials reading their
    rankings, and their selects) when the default changes; every other trial keeps its key."""
    from typing import Literal

    from pydantic import Field

    import locaudit.localize.corruptions as corruptions

    before = _trials(folder, "full")

    class Later(corruptions.PatchingConfig):  # the same config with another default
        positions: Literal["all", "prompt", "last", "completion"] = Field("last")

    monkeypatch.setattr(corruptions, "PatchingConfig", Later)  # what the registry imports by name
    after = _trials(folder, "full")
    assert next(t for t in after if t.kind == "localize").content["config"]["positions"] == "last"
    moved = _rekeyed(before, {"patching", "attribution"})
    assert len(moved) > 2 and _changed(before, after) == moved
    monkeypatch.undo()
    assert [t.key for t in _trials(folder, "full")] == [t.key for t in before]


def test_a_changed_version_changes_the_localize_key(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import locaudit.localize.attribution as attribution
    import locaudit.localize.patching as patching

    before = _trials(folder, "full")
    monkeypatch.setattr(patching, "VERSION", patching.VERSION + 1)
    assert _changed(before, _trials(folder, "full")) == _rekeyed(before, {"patching"})
    monkeypatch.setattr(attribution, "VERSION", attribution.VERSION + 1)
    assert _changed(before, _trials(folder, "full")) == _rekeyed(before, {"patching", "attribution"})
