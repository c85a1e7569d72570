"""The one location grammar (heads.Location) and the named Ranking: every form parses to its kind and numbers,
prints back as written, resolves as HeadSet.parse does, and a study's Localizer reads it into the same trial-key
fields as before."""

from __future__ import annotations

import pytest

from locaudit.errors import ConfigError
from locaudit.heads import HeadSet, Location, Ranking, parse_location
from locaudit.study.localizers import Localizer

L, H = 3, 4
PROBE = [(l, h) for h in range(H) for l in range(L)]
RANKINGS = {"probe": PROBE, "patching": PROBE[::-1]}

# text -> (localizer, kind, k, seed, index, exclude_top), and the study's trial-key fields (Localizer.to_dict)
FORMS = {
    "all": ((None, "all", None, None, None, None), {"kind": "all"}),
    "top5": ((None, "top", 5, None, None, None), {"kind": "top", "k": 5}),
    "probe:top5": (("probe", "top", 5, None, None, None), {"kind": "top", "k": 5}),
    "patching:top5": (("patching", "top", 5, None, None, None), {"kind": "top", "k": 5, "ranking": "patching"}),
    "random3@7": ((None, "random", 3, 7, None, None), {"kind": "random", "k": 3, "seed": 7}),
    "random3@7-top4": ((None, "random", 3, 7, None, 4), {"kind": "random", "k": 3, "seed": 7, "exclude_top": 4}),
    "single@5": ((None, "random", 1, 5, None, None), {"kind": "random", "k": 1, "seed": 5}),
    "single#2@0-top4": ((None, "single", None, 0, 2, 4), {"kind": "single", "seed": 0, "index": 2, "exclude_top": 4}),
    "ranked#1": ((None, "ranked", None, None, 1, None), {"kind": "ranked", "index": 1}),
    "patching:ranked#0": (("patching", "ranked", None, None, 0, None),
                          {"kind": "ranked", "index": 0, "ranking": "patching"}),
    "L1H2,0.3": ((None, "heads", None, None, None, None), {"kind": "heads", "heads": "L1H2,0.3"}),
    "L2,L0H1": ((None, "heads", None, None, None, None), {"kind": "heads", "heads": "L2,L0H1"}),
}


@pytest.mark.parametrize("text", FORMS)
def test_every_form_parses_prints_and_resolves_alike(text):
    fields, key = FORMS[text]
    loc = Location.parse(text)
    assert (loc.localizer, loc.kind, loc.k, loc.seed, loc.index, loc.exclude_top) == fields
    assert Location.parse(str(loc)) == Location.parse(text.removeprefix("probe:"))
    lo = Localizer.parse(text)
    assert lo.to_dict() == key  # trial keys hash these fields: they must not change
    assert Localizer.parse(lo.name) == lo
    want = HeadSet.parse(text, L, H, ranking=RANKINGS)
    for ranking in (RANKINGS, Ranking(RANKINGS)):
        assert loc.resolve(L, H, ranking) == want and lo.resolve(L, H, ranking) == want
    if loc.localizer in (None, "probe"):  # a plain list is the probe's ranking
        assert HeadSet.parse(text, L, H, ranking=PROBE) == want


def test_names_follow_the_text_and_the_study_keeps_its_canonical_names():
    assert HeadSet.parse("single@5", L, H).name == "single@5"
    assert Localizer.parse("single@5").resolve(L, H).name == "random1@5"
    assert HeadSet.parse("patching:top2", L, H, ranking=RANKINGS).name == "patching:top2"
    assert HeadSet.parse("ranked#1", L, H, ranking=PROBE).heads == (PROBE[1],)
    assert HeadSet.parse("L2,L0H1", L, H).name == "L0H1,L2H0,L2H1,L2H2,L2H3"
    assert parse_location("patching:top8") == Location.parse("patching:top8")
    assert Location.format("single", index=2, seed=0, exclude_top=4, localizer="patching") == "patching:single#2@0-top4"
    with pytest.raises(ConfigError, match="location kind 'bogus'"):
        Localizer("bogus").resolve(L, H)


def test_ranking_names_what_is_missing_and_refuses_bad_entries():
    r = Ranking.of(PROBE)
    assert r.names == ("probe",) and r.heads(None, "top2") == tuple(PROBE)
    assert Ranking.of(r) is r and Ranking.of(None) is None and Ranking.of(RANKINGS) == Ranking(RANKINGS)
    with pytest.raises(ConfigError, match="'attribution' ranking; rankings given: patching, probe"):
        HeadSet.parse("attribution:top2", L, H, ranking=RANKINGS)
    with pytest.raises(ConfigError, match="needs the probe head ranking"):
        Location.parse("random2@0-top3").resolve(L, H)
    with pytest.raises(ConfigError, match="pairs"):
        Ranking({"probe": [(0, 0), "L1H1x"]})
    with pytest.raises(ConfigError, match="only 12 heads"):
        HeadSet.parse("ranked#12", L, H, ranking=PROBE)


@pytest.mark.parametrize("bad, match", [("", "empty"), ("L1X2", "cannot parse head 'L1X2'"), ("top", "expected forms"),
                                        ("patching:L1H1", "ranking form"), ("patching:random2@1", "ranking form"),
                                        ("random16", "cannot parse")])
def test_bad_locations_name_the_text(bad, match):
    with pytest.raises(ConfigError, match=match):
        Location.parse(bad)
    with pytest.raises(ConfigError, match=match):
        Localizer.parse(bad)


def test_redraw_rule_stays_with_the_study():
    top = PROBE[:6]
    lo = Localizer("random", k=3, seed=3, avoid_top=6, max_overlap=0.0)
    assert lo.needs_ranking and not Location.parse(lo.name).needs_ranking
    hs = lo.resolve(L, H, Ranking.of(PROBE))
    assert not set(hs.heads) & set(top) and hs.meta["overlap_with_top"] == 0
    assert hs.meta["redraw_attempt"] == lo.resolve(L, H, PROBE).meta["redraw_attempt"]
    with pytest.raises(ConfigError, match="needs the probe head ranking"):
        lo.resolve(L, H)
