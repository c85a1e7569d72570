"""The docs say only what the source, the tests and the measurement files show.

- Generated parts (`<!-- generated:NAME -->`, scripts/gen_docs.py, `make docs`) equal what the source gives.
- Every number a study file's header (or the README, about a study file) states that `locaudit run FILE
  --dry-run` computes is what it computes: trial counts, draws, the rank test's floor, the detectable shift,
  what equivalence needs, test questions, the split.
- Every "checked against X" / "tested equal" claim in README.md, CONTRIBUTING.md and docs/*.md names its
  test, and every test the docs name exists (collected with ast).
- Every measured table (speed, time, memory, accuracy) is rendered from its file in docs/measurements/,
  which states where, when and how it was measured; a figure edited in the doc, or in its file, is caught.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import re
import shutil
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
def test_generated_parts_are_current(shared_data) -> None:
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
    assert all(g.known_block(n) for n in used), [n for n in used if not g.known_block(n)]
    assert set(g.BLOCKS) <= set(used), f"blocks no doc shows: {set(g.BLOCKS) - set(used)}"
    shown = {f"measured.{p.stem}" for p in g.measurement_files()} - {f"measured.{b}" for b in g.BENCHMARKS}
    assert shown <= set(used), f"measurement files no doc shows: {shown - set(used)}"
    for p in g.doc_files():  # an opening marker without its closing one would silently stay as typed
        text = p.read_text(encoding="utf-8")
        assert len(re.findall(r"^<!-- generated:[\w.-]+ -->$", text, re.M)) == len(g.generated_names(text)), p


def _copy_docs(dst: Path) -> None:
    """README.md and the measurement files, as a root for `stale`."""
    shutil.copy(ROOT / "README.md", dst / "README.md")
    shutil.copytree(ROOT / gen().MEASUREMENTS, dst / gen().MEASUREMENTS)


def test_a_deliberately_edited_figure_is_caught_and_regenerated(tmp_path, shared_data) -> None:
    """The check fails on a hand-edited figure inside a generated part and passes on the generated text."""
    g = gen()
    _copy_docs(tmp_path)
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
def test_study_header_numbers_are_the_dry_runs(name: str, shared_data) -> None:
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


def test_readme_numbers_about_a_study_are_the_dry_runs(shared_data) -> None:
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


def test_the_claim_check_catches_a_wrong_number(shared_data) -> None:
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


# ------------------------------------------------------------------------------------------- measured figures
def _bench_part(text: str) -> str:
    m = re.search(r"<!-- generated:bench -->\n(.*?)<!-- /generated:bench -->", text, re.S)
    assert m, "the README shows the benchmark table"
    return m.group(1)


def test_every_measurement_file_states_where_and_when() -> None:
    """Each file in docs/measurements/ is strict JSON with a complete provenance of its kind and a table; a
    benchmark's file has the README table's columns."""
    g = gen()
    files = g.measurement_files()
    assert files, "no measurement files"
    for p in files:
        rec = g.load_measurement(p)
        if p.stem in g.BENCHMARKS:
            assert rec["benchmark"] == p.stem and rec["table"]["columns"] == machine().COLUMNS, p.name
        if rec["provenance"]["kind"] == "transcribed":
            assert "not re-run" in g.source_line(p.name, rec), p.name


def test_a_figure_edited_in_the_doc_is_caught(tmp_path, shared_data) -> None:
    """A figure typed over in the rendered benchmark table makes `--check` fail; `make docs` writes back the
    figure of its measurement file, and the check then passes."""
    g = gen()
    _copy_docs(tmp_path)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    part = _bench_part(readme)
    m = re.search(r"\| (\d+)\.(\d) examples/s", part)
    assert m, "the benchmark table shows collection throughput"
    wrong = part[:m.start(1)] + str(int(m.group(1)) + 1) + part[m.end(1):]
    edited = readme.replace(part, wrong)
    (tmp_path / "README.md").write_text(edited, encoding="utf-8")
    stale = g.stale(tmp_path)
    assert list(stale) == [tmp_path / "README.md"]
    assert stale[tmp_path / "README.md"][1] == readme  # regenerated: the source file's figure again
    (tmp_path / "README.md").write_text(stale[tmp_path / "README.md"][1], encoding="utf-8")
    assert g.stale(tmp_path) == {}


def test_a_figure_edited_in_its_file_makes_the_doc_stale(tmp_path, shared_data) -> None:
    """The doc follows its measurement file: change a figure there and the rendered table is stale until
    regenerated, and the regenerated one shows the new figure with the file's provenance."""
    g = gen()
    _copy_docs(tmp_path)
    path = tmp_path / g.MEASUREMENTS / "bench_mc.json"
    rec = json.loads(path.read_text(encoding="utf-8"))
    row = rec["table"]["rows"][0]
    assert row[1].endswith(" answers/s")
    row[1] = "99.9 answers/s"
    path.write_text(json.dumps(rec), encoding="utf-8")
    stale = g.stale(tmp_path)
    assert list(stale) == [tmp_path / "README.md"]
    new = _bench_part(stale[tmp_path / "README.md"][1])
    assert "| 99.9 answers/s |" in new and "`docs/measurements/bench_mc.json`: transcribed, not re-run" in new


def _record(**changes) -> dict:
    rec = {"schema": gen().SCHEMA, "what": "x",
           "provenance": {"kind": "transcribed", "date": "2026-12-01", "machine": "a 2-core CPU",
                          "cpu_capability": "AVX2", "precision": "fp32", "source": "README.md, commit abc",
                          "note": "not recorded: torch"},
           "table": {"columns": ["a", "b"], "rows": [["1", "2"]]}}
    for key, value in changes.items():
        where, _, field = key.partition("__")
        if field:
            rec[where][field] = value
        else:
            rec[where] = value
    return rec


@pytest.mark.parametrize("changes, message", [
    ({"schema": "other"}, "schema"),
    ({"provenance__kind": "guessed"}, "provenance.kind"),
    ({"provenance__date": ""}, "provenance.date"),
    ({"provenance__date": "last week"}, "provenance.date"),
    ({"provenance__machine": None}, "provenance.machine"),
    ({"provenance__source": ""}, "provenance.source"),
    ({"table__rows": [["1"]]}, r"table.rows\[0\]"),
    ({"table__rows": [["1", 2]]}, r"table.rows\[0\]"),
    ({"notes": "one"}, "notes"),
])
def test_an_incomplete_measurement_file_is_refused_naming_the_field(tmp_path, changes, message) -> None:
    g = gen()
    path = tmp_path / "m.json"
    path.write_text(json.dumps(_record()), encoding="utf-8")
    assert g.load_measurement(path)["table"]["rows"] == [["1", "2"]]
    path.write_text(json.dumps(_record(**changes)), encoding="utf-8")
    with pytest.raises(g.MeasurementError, match=f"m.json: {message}"):
        g.load_measurement(path)


def test_a_measurement_file_with_nan_is_refused(tmp_path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps(_record()).replace('"date": "2026-12-01"', '"date": "2026-12-01", "x": NaN'),
                    encoding="utf-8")
    with pytest.raises(gen().MeasurementError, match="NaN is not strict JSON"):
        gen().load_measurement(path)


def test_a_run_must_record_torch_threads_and_command(tmp_path) -> None:
    rec = _record(provenance={"kind": "run", "date": "2026-12-06T11:00:00+00:00", "machine": "m",
                              "cpu_capability": "AVX2", "precision": "fp32", "torch": "2.13.0", "threads": 2,
                              "command": "python benchmarks/bench_mc.py", "commit": None})
    path = tmp_path / "m.json"
    path.write_text(json.dumps(rec), encoding="utf-8")
    assert "no git commit recorded" in gen().source_line("m.json", gen().load_measurement(path))
    for key in ("torch", "threads", "command"):
        bad = json.loads(json.dumps(rec))
        del bad["provenance"][key]
        path.write_text(json.dumps(bad), encoding="utf-8")
        with pytest.raises(gen().MeasurementError, match=f"provenance.{key}"):
            gen().load_measurement(path)


# ------------------------------------------------------------------------------------ benchmarks' own files
def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@lru_cache(maxsize=1)
def machine():
    return _module("machine")


MACHINE = {"cpu_capability": "AVX512_BF16", "precision": "fp32", "precision_requested": "auto",
           "precision_reason": "r", "threads": 2, "cpu_load_at_start": 1.5, "fp32_gemm_peak_gflops": 100.0}


def test_a_benchmark_writes_what_the_docs_render(tmp_path, capsys) -> None:
    """benchmarks/machine.py `emit` writes a record that gen_docs reads: provenance from this process (date,
    torch, the CPU), strict JSON (NaN as null), and the README's table rendered from it."""
    import torch

    m = machine()
    rows = [["b", "1.0 s", "2.0 s", "2.00x"]]
    out = tmp_path / "docs" / "measurements" / "bench_mc.json"
    out.parent.mkdir(parents=True)
    m.emit(out, "bench_mc", "what", MACHINE, {"model": "tiny:llama", "speed": 1.0, "bad": float("nan")}, rows)
    assert json.loads(capsys.readouterr().out)["bad"] is None
    rec = gen().load_measurement(out)
    p = rec["provenance"]
    assert p["kind"] == "run" and p["torch"] == torch.__version__ and p["cpu_capability"] == "AVX512_BF16"
    assert p["threads"] == 2 and p["command"].startswith("python ") and rec["results"]["bad"] is None
    text = gen().block_bench(tmp_path)
    assert "| b | 1.0 s | 2.0 s | 2.00x | AVX512_BF16, fp32, " + p["date"][:10] + " |" in text
    assert "torch " + torch.__version__ in text and "model tiny:llama" in text
    assert "Not measured in this repository yet" in text
    with pytest.raises(ValueError, match="4 text cells"):
        m.table([["b", "1.0 s", "2.0 s"]])


# Results of each benchmark as its script builds them (only the keys its table reads), at the figures of the
# transcribed files where they exist: the script's rows must then say what the transcribed rows say.
RESULTS = {
    "bench_mc": {"protocol": "iti", "questions": 24, "answers": 178, "batched_answers_per_s": 7.2,
                 "one_at_a_time_answers_per_s": 1.3, "speedup": 5.5, "mc1": 0.25, "mc1_one_at_a_time": 0.25,
                 "mc2": 0.4, "mc2_one_at_a_time": 0.4 + 3e-7},
    "bench_collect_probe": {
        "n_texts": 48, "examples_per_s": {"locaudit": 8.1, "bare_forward": 5.5, "nnsight": 5.5,
                                          "transformer_lens": 5.2, "one_at_a_time": 2.9},
        "fraction_of_fp32_peak": {"locaudit": 0.68, "bare_forward": 0.47, "nnsight": 0.47, "transformer_lens": 0.44,
                                  "one_at_a_time": 0.25},
        "locaudit_speedup_vs": {"bare_forward": 1.47, "nnsight": 1.47, "transformer_lens": 1.56, "one_at_a_time": 2.85},
        "probing": {"heads": 270, "batched_s": 0.39, "sklearn_loop_s": 8.0, "speedup_vs_sklearn": 20.8,
                    "mean_val_acc_batched": 0.61, "mean_val_acc_sklearn": 0.612,
                    "mean_abs_val_acc_diff": 0.002}},
    "bench_tracing": {"study": "hase_smollm2.yaml", "facts": 5, "seconds_per_fact": {"full": 20.9, "shared": 10.2},
                      "speedup_vs_full": {"full": 1.0, "shared": 2.05},
                      "max_abs_diff_of_tracing_variable_vs_full": {"full": 0.0, "shared": 4e-6}},
    "bench_patching": {"heads_patched": 27, "pairs": 4, "batched_heads_x_pairs_per_s": 10.0,
                       "loop_heads_x_pairs_per_s": 2.0, "batched_over_loop": 5.0, "stacked_copies_only_over_loop": 3.0,
                       "batched_vs_loop_max_abs_diff": 1e-6, "attribution_all_heads_s": 1.2,
                       "all_heads_patching_estimated_s": 108.0, "attribution_speedup_over_all_head_patching": 90.0,
                       "attribution_over_forward_backward": 1.1},
    "bench_shared_eval": {"n_edits": 12, "metrics": ["mc", "kl"], "questions": 40, "seconds_together": 30.0,
                          "seconds_one_at_a_time": 60.0, "speedup": 2.0, "ideal_speedup_from_layer_sharing": 2.5,
                          "max_abs_diff": {"mc2": 1e-6, "kl": 2e-6}},
    "bench_optimal_edit": {
        "pairs": 32, "locaudit_auto_checkpointing": False,
        "vs_trl_all_heads": {
            k: {"locaudit_pairs_per_s": 32 / loc, "trl_pairs_per_s": 32 / trl, "speedup_wall": trl / loc,
                "speedup_wall_reference_cached": c, "locaudit_peak_rss_delta_mb": lm, "trl_peak_rss_delta_mb": tm}
            for k, loc, trl, c, lm, tm in [
                ("each tool's default (TRL: checkpointing on; locaudit: auto)", 15.1, 39.5, 3.3, 411, 477),
                ("both with gradient checkpointing", 23.2, 39.5, 2.4, 221, 477),
                ("neither with gradient checkpointing", 15.1, 31.7, 2.8, 411, 800)]},
        "frozen_prefix": {"layer": 24, "n_layers": 30, "one_time_states_wall": 2.7, "speedup_wall": 1.25},
        "runs": {"multi_one_pass": {"wall": 41.4, "heads": ["L1H1"] * 8},
                 "multi_sequential": {"wall": 60.0},
                 "multi16_one_pass": {"wall": 90.86, "heads": ["r"] * 8}, "multi16_sequential": {"wall": 108.64},
                 "prefix_on": {"wall": 6.2}, "prefix_off": {"wall": 7.7}}},
}


@pytest.mark.parametrize("name", gen().BENCHMARKS)
def test_each_benchmark_renders_its_table_rows(name: str) -> None:
    """Every benchmark `make bench` runs turns its results into the README's rows (machine.COLUMNS); where a
    transcribed file holds the same figures, the script's rows carry the same numbers."""
    rows = _module(name).table_rows(RESULTS[name])
    assert rows and machine().table(rows)["rows"] == rows
    path = ROOT / gen().MEASUREMENTS / f"{name}.json"
    if path.exists() and gen().load_measurement(path)["provenance"]["kind"] == "run":
        # a run's record: its table is what the script makes of the results it holds
        rec = gen().load_measurement(path)
        assert _module(name).table_rows(rec["results"]) == rec["table"]["rows"], name
    elif path.exists():
        typed = gen().load_measurement(path)["table"]["rows"]
        assert len(rows) == len(typed)
        for ours, theirs in zip(rows, typed):
            for a, b in zip(ours[1:], theirs[1:]):  # every figure of the typed cell is in the script's cell
                nums = re.findall(r"\d+(?:\.\d+)?(?:e-\d+)?", b)
                assert all(n in a for n in nums if n not in {"0", "1"}), (name, a, b)


# ------------------------------------------------------------------------------------ help texts vs the code
def _help(command: str, param: str) -> str:
    import typer

    from locaudit.cli.main import app

    cmd = typer.main.get_command(app)
    for part in command.split():
        cmd = cmd.commands[part]
    return " ".join(next(p for p in cmd.params if p.name == param).help.split())


def test_checkpointing_help_states_the_threshold_the_code_uses() -> None:
    from locaudit.edit.train import ACTIVATION_BUDGET_BYTES, memory_budget

    text = _help("edit", "checkpointing")
    assert f"{ACTIVATION_BUDGET_BYTES / 1024 ** 3:g} GiB or a quarter of the free memory" in text
    assert 0 < memory_budget() <= ACTIVATION_BUDGET_BYTES
    assert "docs/measurements/bench_optimal_edit.json" in text and (ROOT / "docs/measurements/bench_optimal_edit.json").is_file()


def test_max_questions_help_subsamples_after_the_split() -> None:
    """--max-questions: a subset taken after the 60/20/20 split keeps every question in its split of the whole
    data, in proportion."""
    import inspect

    import pandas as pd

    from locaudit import load_behaviour
    from locaudit.cli.options import MAX_QUESTIONS_HELP

    fractions = inspect.signature(load_behaviour).parameters["fractions"].default
    assert "/".join(str(round(100 * f)) for f in fractions) + " split" in MAX_QUESTIONS_HELP
    assert "AFTER" in MAX_QUESTIONS_HELP and _help("collect", "max_questions") == " ".join(MAX_QUESTIONS_HELP.split())
    df = pd.DataFrame({"prompt": [f"Question {i}?" for i in range(50)], "chosen": ["Yes."] * 50,
                       "rejected": ["No."] * 50})
    full, sub = load_behaviour(df, name="q"), load_behaviour(df, name="q", max_questions=10)
    sizes = []
    for split in ("train", "val", "test"):
        ids = {q.qid for q in sub.questions(split)}
        assert ids <= {q.qid for q in full.questions(split)}, split
        sizes.append(len(ids))
    assert sizes == [6, 2, 2]


def test_precision_texts_name_the_cpu_kinds_auto_may_give_bf16() -> None:
    from locaudit.cli.options import PRECISION_HELP
    from locaudit.models.precision import _FAKE_CAPABILITIES, cpu_has_bf16_hardware
    from locaudit.study.spec import StudySpec

    bf16 = [c for c in _FAKE_CAPABILITIES if cpu_has_bf16_hardware(c)]
    assert bf16 == ["AVX512_BF16", "AMX"]
    for text in (PRECISION_HELP, StudySpec.model_fields["precision"].description):
        assert all(c.replace("_", "-") in text for c in bf16), text
        assert "measures bf16 faster" in text and "i.e. AMX" not in text
