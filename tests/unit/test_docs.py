"""The docs say only what the source and the tests show (issue 29).

- Generated parts (`<!-- generated:NAME -->`, scripts/gen_docs.py, `make docs`) equal what the source gives.
- Every number a study file's header (or the README, about a study file) states that `locaudit run FILE
  --dry-run` computes is what it computes: trial counts, draws, the rank test's floor, the detectable shift,
  what equivalence needs, test questions, the split.
- Every "checked against X" / "tested equal" claim in README.md, CONTRIBUTING.md and docs/*.md names its
  test, and every test the docs name exists (collected with ast).
"""

from __future__ import annotations

import ast
import importlib.util
import math
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@lru_cache(maxsize=1)
def gen():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@lru_cache(maxsize=None)
def design_of(name: str) -> dict:
    return gen().study_design(ROOT / "studies" / name)


# ---------------------------------------------------------------------------------------- generated parts
def test_generated_parts_are_current() -> None:
    """`make docs` would change nothing: no table derived from the source is stale."""
    import difflib

    stale = gen().stale()
    diffs = []
    for p, (old, new) in stale.items():
        diff = difflib.unified_diff(old.splitlines(), new.splitlines(), str(p.relative_to(ROOT)), "generated", n=0,
                                    lineterm="")
        diffs.append("\n".join(list(diff)[:40]))
    assert not stale, "stale generated parts; run `make docs`:\n" + "\n\n".join(diffs)


def test_every_generated_part_is_known_and_used() -> None:
    g = gen()
    used = [n for p in g.doc_files() for n in g.generated_names(p.read_text(encoding="utf-8"))]
    assert set(used) <= set(g.BLOCKS), set(used) - set(g.BLOCKS)
    assert set(g.BLOCKS) <= set(used), f"blocks no doc shows: {set(g.BLOCKS) - set(used)}"
    for p in g.doc_files():  # an opening marker without its closing one would silently stay as typed
        text = p.read_text(encoding="utf-8")
        assert len(re.findall(r"^<!-- generated:[\w.-]+ -->$", text, re.M)) == len(g.generated_names(text)), p


def test_a_deliberately_edited_figure_is_caught_and_regenerated(tmp_path) -> None:
    """The check fails on a hand-edited figure inside a generated part and passes on the generated text."""
    g = gen()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"(<!-- generated:study-designs -->\n.*?\| )(\d+)( \()", readme, re.S)
    assert m, "the README shows the study designs"
    edited = readme[:m.start(2)] + str(int(m.group(2)) + 1) + readme[m.end(2):]
    (tmp_path / "README.md").write_text(edited, encoding="utf-8")
    stale = g.stale(tmp_path)
    assert list(stale) == [tmp_path / "README.md"]
    assert stale[tmp_path / "README.md"][1] == readme
    (tmp_path / "README.md").write_text(readme, encoding="utf-8")
    assert g.stale(tmp_path) == {}


def test_an_unknown_generated_part_is_an_error() -> None:
    with pytest.raises(KeyError, match="nope"):
        gen().render("<!-- generated:nope -->\nx\n<!-- /generated:nope -->", {}, "X.md")


def test_test_question_counts_match_the_data(shared_data) -> None:
    """The generator counts test questions from the data files' known sizes; the dry run loads the files.
    Both give the same number where the data are at hand."""
    from locaudit.cli.run import _test_questions
    from locaudit.study.spec import load_study

    checked = 0
    for path in gen().study_files():
        spec = load_study(path)
        if not Path(spec.resolved_data_spec().partition(":")[2]).is_file():
            continue  # a data root without this file: the dry run could not count it either
        assert gen().n_test_questions(spec) == _test_questions(spec), path.name
        checked += 1
    if not checked:
        pytest.skip(f"no study's data file under {shared_data}")


def test_registered_family_counts_in_prose() -> None:
    """"N registered families (...)" in the README and "N families: ..." in docs/architecture.md name the registry."""
    from locaudit.models.sites import SITES

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    counts = re.findall(r"(\d+) registered families", readme)
    assert counts and {int(c) for c in counts} == {len(SITES)}
    arch = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    m = re.search(r"(\d+) families: ([^.]+)\.", arch)
    assert m and int(m.group(1)) == len(SITES)
    assert sorted(s.strip() for s in m.group(2).split(",")) == sorted(SITES)


# ------------------------------------------------------------------------------- numbers the dry run computes
def _close(shown: str, value: float | None) -> bool:
    """`shown` (as printed: '0.059', '2.35') is `value` rounded to the digits shown."""
    if value is None or not math.isfinite(value):
        return False
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    return abs(float(shown) - value) <= 0.5 * 10 ** -decimals + 1e-12


def _num(s: str) -> int:
    return int(s.replace(",", ""))


KIND_WORDS = {"optimal edits": "optimal", "ITI settings": "iti", "ITI trials": "iti", "validation evaluations": "select",
              "select trials": "select"}


def dry_run_claims(text: str, s: dict) -> list[str]:
    """Every number in `text` of a kind the dry run computes, checked against the study `s` (study_design):
    a list of the claims that disagree. Returns [] when all agree."""
    comps = s["design"]["comparisons"]
    text = " ".join(text.split())  # a claim may break across comment lines
    bad = []

    def check(ok: bool, what: str) -> None:
        if not ok:
            bad.append(what)

    for m in re.finditer(r"\b(\d[\d,]*) trials\b", text):
        check(_num(m.group(1)) == s["trials"], f"{m.group(0)!r}: the dry run counts {s['trials']} trials")
    for m in re.finditer(r"\b(\d[\d,]*) (" + "|".join(KIND_WORDS) + r")\b", text):
        n = s["counts"].get(KIND_WORDS[m.group(2)], 0)
        check(_num(m.group(1)) == n, f"{m.group(0)!r}: the dry run counts {n}")
    for m in re.finditer(r"\b1/(\d+) = (0?\.\d+)", text):
        d = int(m.group(1))
        check(any(c["n_random"] + 1 == d for c in comps) and _close(m.group(2), 1 / d),
              f"{m.group(0)!r}: floors are {[round(c['p_floor'], 4) for c in comps]}")
    for m in re.finditer(r"\bfloor (?:p )?(?:= )?(0?\.\d+)", text):
        check(any(_close(m.group(1), c["p_floor"]) for c in comps),
              f"{m.group(0)!r}: floors are {[round(c['p_floor'], 4) for c in comps]}")
    draws = set()
    for c in comps:
        draws |= {c["n_random"], c["draws_beyond_floor"], c["draws_needed_for_floor"], c["draws_for_equivalence"],
                  c["draws_and_questions_for_equivalence"][0]}
    for m in re.finditer(r"\b(\d+) (?:random )?(?:\d+-head )?draws\b", text):
        check(int(m.group(1)) in draws, f"{m.group(0)!r}: the design's draw numbers are {sorted(d for d in draws if d)}")
    questions = {s["n_questions"]}
    for c in comps:
        questions |= {c["questions_for_equivalence"], c["draws_and_questions_for_equivalence"][1]}
    for m in re.finditer(r"\b(\d+) test (?:questions|items)\b", text):
        check(int(m.group(1)) in questions,
              f"{m.group(0)!r}: the design's question numbers are {sorted(q for q in questions if q)}")
    for m in re.finditer(r"\babout (\d+) draws and (\d+) test questions", text):
        pairs = [tuple(c["draws_and_questions_for_equivalence"]) for c in comps]
        check((int(m.group(1)), int(m.group(2))) in pairs, f"{m.group(0)!r}: equivalence needs {pairs}")
    for m in re.finditer(r"\b(\d+\.\d+) (?:draw-)?sd\b", text):
        check(any(_close(m.group(1), c["detectable_shift_sd"]) for c in comps),
              f"{m.group(0)!r}: detectable shifts are {[round(c['detectable_shift_sd'], 2) for c in comps]} sd")
    for m in re.finditer(r"\b(\d+) single heads\b", text):
        check(int(m.group(1)) == s["single_heads"], f"{m.group(0)!r}: the study has {s['single_heads']} single heads")
    for m in re.finditer(r"\b(\d+)/(\d+)/(\d+)\b", text):
        shown = tuple(int(x) for x in m.groups())
        spec = s["spec"]
        pct = tuple(round(100 * f) for f in spec.data.fractions)
        check(shown in {pct, _split(spec)}, f"{m.group(0)!r}: the split is {_split(spec)} ({'/'.join(map(str, pct))})")
    return bad


def _split(spec) -> tuple[int, ...] | None:
    from locaudit.data.splits import split_sizes

    path = spec.resolved_data_spec().partition(":")[2].replace("\\", "/")
    n = next((v for k, v in gen().QUESTIONS.items() if path.endswith("/" + k)), None)
    n = min(n, spec.data.max_questions) if n and spec.data.max_questions else n or spec.data.max_questions
    return split_sizes(n, spec.data.fractions) if n else None


@pytest.mark.parametrize("name", [p.name for p in gen().study_files()])
def test_study_header_numbers_are_the_dry_runs(name: str) -> None:
    """A study file's header states only the trial counts, draws, floors, shifts and question numbers that
    `locaudit run FILE --dry-run` computes."""
    names = {p.name for p in gen().study_files()}
    bad = []
    for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z(`])", " ".join(gen().header(ROOT / "studies" / name).split())):
        # a sentence naming another study file may speak of that one ("... studies/paper.yaml runs it")
        others = [n for n in re.findall(r"studies/([\w.-]+\.yaml)", sentence) if n in names and n != name]
        results = [dry_run_claims(sentence, design_of(n)) for n in [name, *others]]
        if all(results):
            bad += results[0]
    assert not bad, f"studies/{name}: " + "; ".join(bad)


def _blocks(text: str) -> list[tuple[str, str]]:
    """(section heading, block) for every paragraph, list item and table row outside code fences and
    generated parts."""
    text = gen().BLOCK.sub("", text)
    out, cur, section, fence = [], [], "", False

    def flush():
        if cur:
            out.append((section, " ".join(cur)))
            cur.clear()

    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
            flush()
            continue
        if fence:
            continue
        s = line.strip()
        if not s or s.startswith(("|", "- ", "* ", "#")) or re.match(r"\d+\. ", s):
            flush()
        if s.startswith("#"):
            section = s.lstrip("#").strip()
            continue
        if s:
            cur.append(s)
            if s.startswith("|"):
                flush()
    flush()
    return out


def readme_study_claims() -> list[tuple[str, list[str]]]:
    """(block, study files it speaks of) for the README: a block naming `studies/X.yaml` speaks of X; an
    unnamed one in the quickstart's section, of the quickstart."""
    names = {p.name for p in gen().study_files()}
    out = []
    for section, block in _blocks((ROOT / "README.md").read_text(encoding="utf-8")):
        named = [n for n in re.findall(r"studies/([\w.-]+\.yaml)", block) if n in names]
        if not named and section == "The quickstart" and not re.search(r"studies/", block):
            named = ["quickstart.yaml"]
        if named:
            out.append((block, sorted(set(named))))
    return out


def test_readme_numbers_about_a_study_are_the_dry_runs() -> None:
    """The README's paragraphs and table rows about a study file state its dry run's numbers (a block naming
    several study files must agree with one of them)."""
    errors = []
    claims = readme_study_claims()
    assert any(s == ["quickstart.yaml"] for _, s in claims), "the README's quickstart section is no longer found"
    for block, studies in claims:
        results = {n: dry_run_claims(block, design_of(n)) for n in studies}
        if all(results.values()):
            errors.append(f"{block[:80]!r}...: " + "; ".join(f"{n}: {', '.join(b)}" for n, b in results.items()))
    assert not errors, "\n".join(errors)


def test_the_claim_check_catches_a_wrong_number() -> None:
    s = design_of("quickstart.yaml")
    assert dry_run_claims("19 random 8-head draws; 1/20 = 0.05", s) == []
    assert dry_run_claims("20 random 8-head draws", s) and dry_run_claims("1/20 = 0.06", s)
    assert dry_run_claims(f"{s['trials'] + 1} trials", s) and not dry_run_claims(f"{s['trials']} trials", s)


# ---------------------------------------------------------------------------------------------- tested claims
# Words that claim a property a test shows; a block that uses one names its test.
CLAIM = re.compile(r"checked against|checked equal|checks? (?:them|that)|tested equal|tested on|tested against|"
                   r"a test checks|bit[- ]for[- ]bit|bit[- ]identical|reproduces? logits|equal to (?:TRL|PEFT|scipy)",
                   re.I)
TEST_REF = re.compile(r"(tests/[\w/]+\.py)(?:::([\w:]+))?|`(test_\w+?)(\.py)?`")


@lru_cache(maxsize=None)
def defined_tests(path: Path) -> frozenset[str]:
    """`name` and `Class::name` of every test function in a test file (by ast, nothing imported)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {f"{node.name}::{f.name}" for f in node.body
                      if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.name.startswith("test")}
    return frozenset(names)


def named_tests(text: str) -> list[tuple[str, str | None]]:
    """(file or bare name, test name or None) of every test a text names."""
    out = []
    for m in TEST_REF.finditer(text):
        if m.group(1):
            out.append((m.group(1), m.group(2)))
        elif m.group(4):
            out.append((m.group(3) + ".py", None))
        else:
            out.append(("", m.group(3)))
    return out


def test_every_named_test_exists() -> None:
    all_files = sorted((ROOT / "tests").rglob("test_*.py"))
    everywhere = set().union(*(defined_tests(p) for p in all_files))
    missing = []
    for doc in gen().doc_files():
        for file, name in named_tests(doc.read_text(encoding="utf-8")):
            rel = doc.relative_to(ROOT)
            if not file:  # a bare `test_x`: some test file has it
                if name not in everywhere:
                    missing.append(f"{rel}: `{name}`")
                continue
            paths = [ROOT / file] if "/" in file else [p for p in all_files if p.name == file]
            if not paths or not paths[0].is_file():
                missing.append(f"{rel}: {file} does not exist")
            elif name and name not in defined_tests(paths[0]):
                missing.append(f"{rel}: {file}::{name} does not exist")
    assert not missing, "\n".join(missing)


def test_every_tested_claim_names_its_test() -> None:
    """A paragraph, list item or table row that says a property is checked or tested names the test."""
    unbacked = []
    for doc in gen().doc_files():
        for _, block in _blocks(doc.read_text(encoding="utf-8")):
            if CLAIM.search(block) and not named_tests(block):
                unbacked.append(f"{doc.relative_to(ROOT)}: {block[:120]!r}")
    assert not unbacked, "claims without a named test:\n" + "\n".join(unbacked)


def test_the_reference_check_parses_both_forms() -> None:
    assert named_tests("(tests/unit/test_stats.py::test_welch_matches_scipy) and `test_interval_coverage`") == [
        ("tests/unit/test_stats.py", "test_welch_matches_scipy"), ("", "test_interval_coverage")]
    assert "test_welch_matches_scipy" in defined_tests(ROOT / "tests/unit/test_stats.py")
