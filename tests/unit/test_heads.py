import pytest

from locaudit.errors import ConfigError
from locaudit.heads import HeadSet


def test_explicit_forms_sort_and_dedupe():
    hs = HeadSet.parse("L3H1, L0H2,0.2", 4, 3)
    assert hs.heads == ((0, 2), (3, 1))
    assert hs.to_string() == "L0H2,L3H1"
    assert HeadSet.parse(hs.to_string()) == hs


def test_all_and_layer():
    assert len(HeadSet.parse("all", 3, 4)) == 12
    assert HeadSet.parse("L2", 3, 4).heads == tuple((2, h) for h in range(4))


def test_top_needs_ranking_and_takes_prefix():
    ranking = [(2, 1), (0, 0), (1, 3), (0, 1)]
    assert HeadSet.parse("top2", 3, 4, ranking=ranking).heads == ((0, 0), (2, 1))
    with pytest.raises(ConfigError, match="ranking"):
        HeadSet.parse("top2", 3, 4)
    with pytest.raises(ConfigError, match="top9"):
        HeadSet.parse("top9", 3, 4, ranking=ranking)


def test_random_is_seeded_and_reproducible():
    a = HeadSet.parse("random5@3", 6, 4)
    b = HeadSet.parse("random5@3", 6, 4)
    c = HeadSet.parse("random5@4", 6, 4)
    assert a == b and len(a) == 5 and a != c
    assert a.name == "random5@3"


def test_random_excluding_top():
    ranking = [(l, h) for l in range(3) for h in range(2)]
    for seed in range(20):
        hs = HeadSet.parse(f"random2@{seed}-top4", 3, 2, ranking=ranking)
        assert not set(hs.heads) & set(ranking[:4])
    with pytest.raises(ConfigError):
        HeadSet.parse("random3@0-top4", 3, 2, ranking=ranking)  # only 2 heads left


def test_single_draw():
    hs = HeadSet.parse("single@7", 5, 5)
    assert len(hs) == 1 and hs == HeadSet.parse("random1@7", 5, 5)


@pytest.mark.parametrize("bad", ["", "L1X2", "top", "random16", "randomx@1", "L1H2;L3H4"])
def test_bad_specs_name_the_problem(bad):
    with pytest.raises(ConfigError):
        HeadSet.parse(bad, 4, 4, ranking=[(0, 0)])


def test_out_of_range_head_is_rejected():
    with pytest.raises(ConfigError, match="L9H0"):
        HeadSet.parse("L9H0", 4, 4)


def test_masks():
    hs = HeadSet.parse("L1H0,L2H3", 3, 4)
    m = hs.head_mask(3, 4)
    assert m.sum() == 2 and m[1, 0] and m[2, 3]
    dm = hs.dim_mask(3, 4, 5)
    assert dm.shape == (3, 20) and dm.sum() == 10
    assert dm[1, :5].all() and not dm[1, 5:].any() and dm[2, 15:].all()
    assert hs.layers == (1, 2) and hs.heads_in(2) == (3,)


def test_dict_roundtrip_and_errors():
    hs = HeadSet.parse("random3@1", 4, 4)
    assert HeadSet.from_dict(hs.to_dict()) == hs
    assert HeadSet.from_dict(hs.to_dict()).name == "random3@1"
    assert HeadSet(hs.heads, "other") == hs and len({hs, HeadSet(hs.heads, "other")}) == 1
    with pytest.raises(ConfigError, match="malformed"):
        HeadSet.from_dict({"name": "x"})
