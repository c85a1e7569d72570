"""The Python API end to end on a tiny model, as a notebook would use it (the README's example)."""

from __future__ import annotations

import pytest
import torch

from locaudit.errors import ConfigError, DataError


def toy_frame(n: int = 30):
    import pandas as pd

    rows = [{"prompt": f"Is {i} an even number?", "chosen": "Yes." if i % 2 == 0 else "No.",
             "rejected": "No." if i % 2 == 0 else "Yes."} for i in range(n)]
    return pd.DataFrame(rows)


def test_notebook_example(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    import locaudit.evaluate.runner  # noqa: F401  (the API's names survive the subpackages being imported)
    # --- the README example, with a tiny random model in place of SmolLM2 ---
    import pandas as pd

    from locaudit import collect, evaluate_edit, fit_iti, load_behaviour, load_model, locate, probe, train_edit

    lm = load_model("tiny:llama")  # e.g. load_model("smollm2-135m-instruct")
    df = pd.DataFrame({"prompt": [f"Is {i} an even number?" for i in range(30)],
                       "chosen": ["Yes." if i % 2 == 0 else "No." for i in range(30)],
                       "rejected": ["No." if i % 2 == 0 else "Yes." for i in range(30)]})
    data = load_behaviour(df, name="even")  # 60/20/20 split by question
    acts = collect(lm, data, progress=False)  # [N, layers, heads, head_dim] at the last token
    pr = probe(acts)  # one logistic probe per head
    iti = fit_iti(acts, "top4", probe=pr, alpha=5)  # ITI at the probe's 4 best heads
    edit, log = train_edit(lm, data, "top4", probe=pr, epochs=2, batch_size=4, progress=False, precision="fp32")
    res = evaluate_edit(lm, edit, data, metrics="kl,ce,pref", precision="fp32", progress=False, kl_max_tokens=256)
    base = evaluate_edit(lm, None, data, metrics="pref", precision="fp32", progress=False)
    # --- end of the example ---
    L, H, D = lm.sites.shape
    assert acts.shape == (len(data.probe_examples()), L, H, D)
    assert pr.val_acc.shape == (L, H)
    top4 = locate("top4", lm, pr)
    assert iti.heads == top4 and edit.heads == top4 and len(top4) == 4
    assert log.epochs and log.n_train == len(data.pairs("train"))
    assert res.split == "test" and res.n_questions == len(data.questions("test"))
    assert base.edit == {"kind": "none"}
    assert set(res.metrics) >= {"kl", "ce", "pref"}


def test_load_behaviour_from_a_dataframe_and_a_dataset_agree():
    datasets = pytest.importorskip("datasets")
    from locaudit import load_behaviour

    df = toy_frame()
    a = load_behaviour(df, name="even")
    b = load_behaviour(datasets.Dataset.from_pandas(df), name="even")
    assert a.fingerprint == b.fingerprint and len(a.pairs()) == 30
    assert {len(a.questions(s)) for s in ("train", "val", "test")} == {18, 6}
    renamed = load_behaviour(df.rename(columns={"prompt": "question"}), columns={"prompt": "question"})
    assert renamed.fingerprint != "" and len(renamed.pairs()) == 30


def test_load_behaviour_from_a_pairs_file_equals_the_frame(tmp_path):
    from locaudit import load_behaviour

    df = toy_frame()
    path = tmp_path / "pairs.csv"
    df.to_csv(path, index=False)
    assert load_behaviour(f"pairs:{path}").fingerprint == load_behaviour(df).fingerprint


def test_bad_tables_name_the_row_and_column():
    from locaudit import load_behaviour

    df = toy_frame()
    with pytest.raises(DataError, match="missing column"):
        load_behaviour(df.drop(columns=["chosen"]))
    df.loc[3, "rejected"] = None
    with pytest.raises(DataError, match="row 3.*rejected"):
        load_behaviour(df)
    with pytest.raises(ConfigError, match="DataFrame"):
        load_behaviour(42)
    with pytest.raises(ConfigError, match="tiny:FAMILY"):
        from locaudit import load_model

        load_model("tiny:nonsense")


def test_locate_speaks_the_location_language():
    from locaudit import locate

    ranking = [(2, 1), (0, 0), (1, 3), (0, 1)]
    assert locate("top2", (3, 4), ranking).heads == ((0, 0), (2, 1))
    assert locate("patching:top1", (3, 4), {"probe": ranking, "patching": [(1, 1)]}).heads == ((1, 1),)
    assert locate("single#2@0", (3, 4)) == locate("single#2@0", (3, 4))
    assert len(locate("all", (3, 4))) == 12 and torch.is_tensor(locate("L1", (3, 4)).head_mask(3, 4))


@pytest.mark.parametrize("text", ["top16", "random16@3", "random16@3-top16", "single#5@0", "single#5@0-top16",
                                  "L12H3,L20H1", "L12", "all", "patching:top16", "attribution:top8",
                                  "patching:random4@1-top8"])
def test_one_location_language_for_cli_api_and_studies(text):
    """A study's Localizer prints the same string it parses, and resolves to HeadSet.parse's heads."""
    from locaudit.heads import HeadSet
    from locaudit.study.localizers import Localizer

    lo = Localizer.parse(text)
    assert lo.name == text and Localizer.parse(lo.name) == lo
    L, H = 24, 16
    probe_rank = [(l, h) for h in range(H) for l in range(L)]
    rankings = {"probe": probe_rank, "patching": probe_rank[::-1], "attribution": probe_rank[5:] + probe_rank[:5]}
    assert lo.resolve(L, H, rankings) == HeadSet.parse(text, L, H, ranking=rankings)


def test_location_aliases_and_errors():
    from locaudit.heads import HeadSet, parse_location
    from locaudit.study.localizers import Localizer

    assert Localizer.parse("probe:top16") == Localizer.parse("top16") == Localizer("top", k=16)
    assert Localizer.parse("single@5").resolve(4, 4) == HeadSet.parse("single@5", 4, 4)
    assert parse_location("patching:top8").localizer == "patching"
    with pytest.raises(ConfigError, match="patching"):
        HeadSet.parse("patching:top2", 3, 4, ranking=[(0, 0), (1, 1)])  # only the probe's ranking given
    with pytest.raises(ConfigError, match="ranking form"):
        HeadSet.parse("patching:L1H1", 3, 4)
    with pytest.raises(ConfigError):
        Localizer.parse("L1X2")
    # the study's keys do not change: a probe ranking stays implicit
    assert Localizer.parse("top16").to_dict() == {"kind": "top", "k": 16}
    assert Localizer.parse("patching:top16").to_dict() == {"kind": "top", "k": 16, "ranking": "patching"}
