"""Study spec validation and trial expansion: errors name the field, keys are content hashes."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest

from locaudit.errors import ConfigError
from locaudit.study.localizers import Localizer
from locaudit.study.spec import load_study, parse_study
from locaudit.study.trials import expand

BASE = {
    "name": "t",
    "model": {"name": "tiny:llama"},
    "data": {"spec": "truthfulqa:data/tqa.csv", "max_questions": 20},
    "localizers": {"probe": {"top_k": 4}, "random": {"n": 3}, "single": {"n": 2}},
    "iti": {"alphas": [1.0, 5.0]},
    "optimal": {"taus": [0.1]},
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tqa.csv").write_text("Type,Category,Question\n")
    return tmp_path


def spec_of(folder: Path, **changes):
    obj = copy.deepcopy(BASE)
    for path, value in changes.items():
        parts = path.split("__")
        d = obj
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = value
    return parse_study(obj, folder, "study.yaml")


def test_load_yaml_resolves_paths_against_its_folder(folder: Path, monkeypatch) -> None:
    (folder / "studies").mkdir()
    y = folder / "studies" / "s.yaml"
    y.write_text(textwrap.dedent("""
        name: s
        data: {spec: "truthfulqa:${LOCAUDIT_TEST_DATA:-..}/data/tqa.csv"}
    """))
    monkeypatch.delenv("LOCAUDIT_TEST_DATA", raising=False)
    spec = load_study(y)
    assert spec.resolved_data_spec() == f"truthfulqa:{(folder / 'data' / 'tqa.csv').resolve()}"
    monkeypatch.setenv("LOCAUDIT_TEST_DATA", str(folder))
    assert load_study(y).resolved_data_spec() == f"truthfulqa:{folder / 'data' / 'tqa.csv'}"


@pytest.mark.parametrize("change, field, value", [
    ({"optimal__tauz": [0.1]}, "optimal.tauz", "[0.1]"),
    ({"optimal__taus": ["x"]}, "optimal.taus.0", "'x'"),
    ({"optimal__taus": [-0.1]}, "optimal.taus", "[-0.1]"),
    ({"localizers__probe__top_k": 0}, "localizers.probe.top_k", "0"),
    ({"data__fractions": [0.5, 0.2, 0.2]}, "data.fractions", "[0.5, 0.2, 0.2]"),
    ({"evaluation__split": "dev"}, "evaluation.split", "'dev'"),
    ({"localizers__single__heads": ["L1"]}, "localizers.single.heads", "['L1']"),
    ({"optimal__train_options": {"warmup": 0.1}}, "optimal.train_options", "{'warmup': 0.1}"),
    ({"optimal__train_options": {"tau": 0.3}}, "optimal.train_options", "{'tau': 0.3}"),
    ({"model__dtype": "int8"}, "model.dtype", "'int8'"),
])
def test_errors_name_field_and_value(folder: Path, change: dict, field: str, value: str) -> None:
    with pytest.raises(ConfigError) as e:
        spec_of(folder, **change)
    msg = str(e.value)
    assert "study.yaml" in msg and f"{field}:" in msg and value in msg, msg


def test_missing_data_file_and_env(folder: Path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match=r"data\.spec.*does not exist"):
        spec_of(folder, data__spec="truthfulqa:nope/tqa.csv")
    monkeypatch.delenv("LOCAUDIT_NOT_SET", raising=False)
    with pytest.raises(ConfigError, match=r"data\.spec: environment variable \$\{LOCAUDIT_NOT_SET\}"):
        spec_of(folder, data__spec="truthfulqa:${LOCAUDIT_NOT_SET}/tqa.csv")
    with pytest.raises(ConfigError, match="base_dir"):
        parse_study({**BASE, "base_dir": "/"}, folder)


def test_expansion_counts_and_unique_keys(folder: Path) -> None:
    trials = expand(spec_of(folder))
    kinds = [t.kind for t in trials]
    # iti: (top + 3 random) x 2 alphas; optimal: (top + 3 random + 2 single + all) x 1 tau x 1 lr x 1 seed
    assert kinds.count("collect") == 1 and kinds.count("probe") == 1 and kinds.count("baseline") == 1
    assert kinds.count("iti") == 4 * 2 and kinds.count("optimal") == 7
    assert len({t.key for t in trials}) == len(trials)
    by_key = {t.key: t for t in trials}
    for t in trials:  # dependencies come first
        for d in t.deps:
            assert trials.index(by_key[d]) < trials.index(t)


def _keys(spec, kinds=("collect", "probe", "judge", "baseline", "iti", "optimal")) -> set[str]:
    return {t.key for t in expand(spec) if t.kind in kinds}


def test_adding_a_grid_value_keeps_other_keys(folder: Path) -> None:
    before = _keys(spec_of(folder))
    after_alpha = _keys(spec_of(folder, iti__alphas=[1.0, 5.0, 10.0]))
    assert before < after_alpha and len(after_alpha - before) == 4
    after_tau = _keys(spec_of(folder, optimal__taus=[0.1, 0.3]))
    assert before < after_tau and len(after_tau - before) == 7
    more_draws = _keys(spec_of(folder, localizers__random__n=5))
    assert before < more_draws and len(more_draws - before) == 2 * 2 + 2  # iti x 2 alphas + optimal
    more_singles = _keys(spec_of(folder, localizers__single__n=3))
    assert before < more_singles and len(more_singles - before) == 1
    # with the validation 'select' trials too: a new grid value only adds trials
    all_kinds = ("collect", "probe", "judge", "baseline", "iti", "optimal", "select")
    assert _keys(spec_of(folder), all_kinds) < _keys(spec_of(folder, optimal__taus=[0.1, 0.3]), all_kinds)


def test_nested_selection_scores_gridded_trials_on_validation(folder: Path) -> None:
    trials = expand(spec_of(folder))  # ITI has two alphas; optimal one (tau, lr) per group
    by_key = {t.key: t for t in trials}
    sel = [t for t in trials if t.kind == "select"]
    assert {by_key[t.content["of"]].kind for t in sel} == {"iti"}
    assert len(sel) == sum(t.kind == "iti" for t in trials)
    for t in sel:
        assert t.content["select"]["split"] == "val" and t.deps[0] == t.content["of"]
        assert t.content["edit_dir"] == f"trials/{t.content['of']}/edit"
    gridded = expand(spec_of(folder, optimal__taus=[0.1, 0.3]))
    opt = {t.key: t for t in gridded if t.kind == "optimal"}
    of_opt = [t for t in gridded if t.kind == "select" and t.content["of"] in opt]
    assert len(of_opt) == len(opt) and all(t.content["edit_dir"].startswith("shared/optimal-") for t in of_opt)
    # cross-fitting costs no validation trials
    assert not [t for t in expand(spec_of(folder, evaluation__selection="cross-fit")) if t.kind == "select"]


def test_keys_follow_content_not_execution(folder: Path) -> None:
    a = expand(spec_of(folder))
    assert [t.key for t in a] == [t.key for t in expand(spec_of(folder, model__device="cpu",
                                                                     optimal__batch_edits=4))]
    changed_eval = expand(spec_of(folder, evaluation__max_new_tokens=20))
    shared = {t.key for t in a if t.kind in ("collect", "probe")}
    assert shared == {t.key for t in changed_eval if t.kind in ("collect", "probe")}
    assert not ({t.key for t in a if t.kind == "iti"} & {t.key for t in changed_eval if t.kind == "iti"})
    (folder / "data" / "tqa.csv").write_text("Type,Category,Question\nx,y,z\n")  # new data content
    assert not ({t.key for t in a} & {t.key for t in expand(spec_of(folder))})


def test_batch_keys_group_equal_hyperparameters(folder: Path) -> None:
    trials = [t for t in expand(spec_of(folder, optimal__taus=[0.1, 0.2])) if t.kind == "optimal"]
    groups: dict = {}
    for t in trials:
        groups.setdefault(t.batch_key, []).append(t)
    assert len(groups) == 2  # one per tau; lr and localizer vary inside a batch
    assert all(len({t.content["tau"] for t in g}) == 1 for g in groups.values())


def test_localizers_resolve() -> None:
    ranking = [(l, h) for l in range(3) for h in range(4)][::-1]
    singles = [Localizer("single", seed=7, index=i).resolve(3, 4) for i in range(12)]
    assert len({s.heads for s in singles}) == 12  # distinct heads, all of them
    ex = [Localizer("single", seed=7, index=i, exclude_top=4).resolve(3, 4, ranking) for i in range(8)]
    assert not any(set(s.heads) & set(ranking[:4]) for s in ex)
    r = Localizer("random", k=4, seed=1, exclude_top=4).resolve(3, 4, ranking)
    assert len(r) == 4 and not set(r.heads) & set(ranking[:4])
    assert Localizer("top", k=3).resolve(3, 4, ranking).heads == tuple(sorted(ranking[:3]))
    assert len(Localizer("all").resolve(3, 4)) == 12
    with pytest.raises(ConfigError, match="ranking"):
        Localizer("top", k=3).resolve(3, 4)
    with pytest.raises(ConfigError, match="only 8 distinct"):
        Localizer("single", seed=0, index=8, exclude_top=4).resolve(3, 4, ranking)


def test_ready_made_studies_load() -> None:
    root = Path(__file__).resolve().parents[2] / "studies"
    for name in ("quickstart.yaml", "paper.yaml"):
        path = root / name
        if not path.exists():
            pytest.skip(f"{path} missing")
        try:
            spec = load_study(path)
        except ConfigError as e:
            if "does not exist" in str(e):
                pytest.skip(f"shared data absent: {e}")
            raise
        kinds = {t.kind for t in expand(spec)}
        assert {"collect", "probe", "baseline", "iti", "optimal"} <= kinds


def test_judge_is_a_shared_step(folder: Path) -> None:
    trials = expand(spec_of(folder, evaluation={"judge": "reference:bleu", "metrics": ["mc", "gen"]}))
    (judge,) = [t for t in trials if t.kind == "judge"]
    evals = [t for t in trials if t.kind in ("baseline", "iti", "optimal")]
    assert evals and all(judge.key in t.deps for t in evals)
    assert all(t.content["evaluation"]["judge"] == "reference:bleu" for t in evals)
    no_gen = expand(spec_of(folder, evaluation={"judge": "reference:bleu", "metrics": ["mc"]}))
    assert not [t for t in no_gen if t.kind == "judge"]
    with pytest.raises(ConfigError, match=r"evaluation\.metrics.*'generation'"):
        spec_of(folder, evaluation={"metrics": ["generation"]})


def test_evaluation_embeds_eval_config(folder: Path) -> None:
    """The evaluation section takes EvalConfig's fields (the Python API's config); every result-defining
    one is in the evaluation trials' content, speed settings are not."""
    from locaudit.evaluate.runner import EvalConfig

    base = expand(spec_of(folder))
    ev = next(t for t in base if t.kind == "baseline").content["evaluation"]
    assert ev["protocol"] == EvalConfig().protocol and "batch_size" not in ev and "precision" not in ev
    bare = expand(spec_of(folder, evaluation__protocol="bare"))
    assert {t.key for t in base if t.kind == "collect"} == {t.key for t in bare if t.kind == "collect"}
    assert not ({t.key for t in base if t.kind == "iti"} & {t.key for t in bare if t.kind == "iti"})
    faster = expand(spec_of(folder, evaluation__batch_size=4, evaluation__gen_batch_size=2))
    assert [t.key for t in faster] == [t.key for t in base]
    with pytest.raises(ConfigError, match="protocoll"):
        spec_of(folder, evaluation__protocoll="bare")
    with pytest.raises(ConfigError, match="judge_threshold"):
        spec_of(folder, evaluation__judge_threshold=1.5)
    # a KL text file counts by its content, not its place
    (folder / "a.txt").write_text("Some generic English text. " * 20)
    one = expand(spec_of(folder, evaluation__kl_text="a.txt"))
    ev = next(t for t in one if t.kind == "baseline").content["evaluation"]
    assert ev["kl_text"].startswith("file:sha256:")
    (folder / "b").mkdir()
    (folder / "b" / "a.txt").write_text("Some generic English text. " * 20)
    assert [t.key for t in expand(spec_of(folder, evaluation__kl_text="b/a.txt"))] == [t.key for t in one]


def test_judge_must_fit_the_behaviour(folder: Path) -> None:
    """TruthfulQA's truth/info judges are refused for a CAA behaviour (they would score it meaninglessly)."""
    with pytest.raises(ConfigError, match="valid for"):
        spec_of(folder, data__spec="caa:sycophancy", evaluation__judge="default", evaluation__metrics=["gen"])
    spec_of(folder, data__spec="caa:sycophancy", evaluation__metrics=["ab", "kl"])  # A/B items need no judge


def test_ranked_single_heads_are_the_probes_best_alone(folder: Path) -> None:
    ranking = [(2, 1), (0, 3), (1, 0), (2, 2)]
    loc = Localizer.parse("ranked#1")
    assert loc.kind == "ranked" and loc.group == "single" and loc.name == "ranked#1"
    assert Localizer.parse(loc.name) == loc and loc.needs_ranking
    assert loc.resolve(3, 4, ranking).heads == ((0, 3),)
    with pytest.raises(ConfigError, match="ranking"):
        loc.resolve(3, 4)
    with pytest.raises(ConfigError, match="only 4 heads"):
        Localizer.parse("ranked#4").resolve(3, 4, ranking)
    trials = expand(spec_of(folder, localizers__single={"n": 2, "top": 2}))
    probe = next(t for t in trials if t.kind == "probe")
    ranked = [t for t in trials if t.kind == "optimal" and t.localizer.kind == "ranked"]
    assert [t.localizer.name for t in ranked] == ["ranked#0", "ranked#1"]
    assert all(probe.key in t.deps and t.group == "single" for t in ranked)
    # the sampled singles keep their keys when ranked heads are added
    plain = {t.key for t in expand(spec_of(folder)) if t.kind == "optimal"}
    assert {t.key for t in trials if t.kind == "optimal" and t.localizer.kind != "ranked"} == plain
