"""Regenerate the parts of README.md, CONTRIBUTING.md and docs/*.md that derive from the source (`make docs`).

A generated part sits between two marker comments, and only its body is rewritten; the prose around it
stays hand-written:

    <!-- generated:NAME -->
    ...
    <!-- /generated:NAME -->

NAME is one of BLOCKS below: the CLI's commands (from the typer app), the study file's fields
(study/spec.py's pydantic models), TrainConfig and EvalConfig, the registered model families
(models/sites.py) and what `locaudit run FILE --dry-run` computes for every study file in studies/
(trials by kind, draws, the rank test's floor, the best outcome the design can reach, equivalence).
Nothing loads a model or data: the dry-run part expands the trials and runs the design checks only, with
the test-question count computed from the data's known size (`n_test_questions`).

Measured figures (speed, time, memory, accuracy) come from the files in docs/measurements/ (strict JSON:
a table, its provenance, and a benchmark's raw results): `bench` is the README's benchmark table, one row
group per benchmarks/bench_*.py that wrote `docs/measurements/NAME.json` (`make bench`), and
`measured.NAME` is the table of docs/measurements/NAME.json. Each ends with where, when and how its
figures were measured; a file whose figures were transcribed from an earlier statement says so.

    python scripts/gen_docs.py            # rewrite the generated parts
    python scripts/gen_docs.py --check    # exit 1 and name each stale part (tests/unit/test_docs.py)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "CONTRIBUTING.md", "docs")
BLOCK = re.compile(r"(?P<open><!-- generated:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(?P<close><!-- /generated:(?P=name) -->)",
                   re.S)
# The environment a study file reads; the generated numbers must not depend on the machine's setting.
STUDY_ENV = ("LOCAUDIT_JUDGE", "LOCAUDIT_PAPER_MODEL", "HASE_FACTS")
MEASUREMENTS = "docs/measurements"
SCHEMA = "locaudit-measurement/1"  # benchmarks/machine.py writes it
# The benchmarks whose measurement files the README's table shows, in its order.
BENCHMARKS = ("bench_collect_probe", "bench_mc", "bench_optimal_edit", "bench_shared_eval", "bench_patching",
              "bench_tracing")
# What a measurement's provenance must state. A run (benchmarks/machine.py `provenance`) records its
# machine itself; a transcription records where the figures were first stated and what that statement
# said of the machine ("not stated" where it said nothing).
NOT_STATED = "not stated"
PROVENANCE = {"run": ("date", "machine", "cpu_capability", "precision", "torch", "threads", "command", "commit"),
              "transcribed": ("date", "machine", "cpu_capability", "precision", "source", "note")}
# Question counts of the built-in data files the study files use (data/registry.py), so that the design
# checks know the number of test questions without the data at hand. tests/unit/test_docs.py checks them
# against the files where the data root has them.
QUESTIONS = {
    "truthfulqa/data/v1/TruthfulQA.csv": 817,
    "truthfulqa/data/v0/TruthfulQA.csv": 817,
    "truthfulqa/TruthfulQA.csv": 790,
}


# ------------------------------------------------------------------------------------------------ files
def doc_files(root: Path = ROOT) -> list[Path]:
    """Every Markdown file that may hold generated parts or claims: README.md, CONTRIBUTING.md, docs/*.md."""
    out = []
    for d in DOCS:
        p = root / d
        out += sorted(p.glob("*.md")) if p.is_dir() else [p] if p.exists() else []
    return out


def study_files(root: Path = ROOT) -> list[Path]:
    """The study files `locaudit run` reads (Hase studies have their own runner: `locaudit hase dry-run`)."""
    return [p for p in sorted((root / "studies").glob("*.yaml")) if not p.name.startswith("hase_")]


def header(path: Path) -> str:
    """A study file's header: its leading comment lines, without the '#'."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ cells
def cell(text: Any) -> str:
    """Text for one Markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def type_name(ann: Any) -> str:
    """A field's annotation as a reader would write it: 'int or null', 'ipo / dpo / sft', 'list of float'."""
    from pydantic import BaseModel

    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if ann is type(None):
        return "null"
    if ann is Any:
        return "any"
    if origin is typing.Literal:
        return " / ".join(json.dumps(a) if not isinstance(a, str) else a for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(type_name(a) for a in args))
    if origin is list:
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is tuple:
        return "(" + ", ".join(type_name(a) for a in args) + ")" if args else "tuple"
    if origin is dict:
        return "mapping"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return f"section ({ann.__name__})"
    return getattr(ann, "__name__", str(ann).replace("typing.", ""))


def default_text(field: Any) -> str:
    """A field's default as YAML would spell it; 'required' where it has none."""
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, tuple):
        value = list(value)
    return "`" + json.dumps(value) + "`" if not isinstance(value, str) else (f'`"{value}"`' if value else '`""`')


def _model_of(ann: Any) -> type | None:
    """The pydantic model a field holds (also through `X | None`), else None."""
    from pydantic import BaseModel

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in typing.get_args(ann):
        m = _model_of(a)
        if m is not None:
            return m
    return None


def field_rows(model: type, prefix: str = "") -> list[str]:
    """One table row per field of a pydantic model, nested sections as dotted names after their own row."""
    rows = []
    for name, f in model.model_fields.items():
        rows.append(f"| `{prefix}{name}` | {cell(type_name(f.annotation))} | {cell(default_text(f))} | "
                    f"{cell(f.description or '')} |")
        sub = _model_of(f.annotation)
        if sub is not None:
            rows += field_rows(sub, f"{prefix}{name}.")
    return rows


def field_table(model: type, prefix: str = "") -> str:
    return "\n".join(["| field | type | default | description |", "|---|---|---|---|", *field_rows(model, prefix)])


# ----------------------------------------------------------------------------------------------- blocks
def block_study_spec() -> str:
    """The study file's fields (study/spec.py StudySpec), one table per top-level section."""
    from locaudit.study.spec import StudySpec

    top, parts = [], []
    for name, f in StudySpec.model_fields.items():
        sub = _model_of(f.annotation)
        if sub is None:
            top.append(f"| `{name}` | {cell(type_name(f.annotation))} | {cell(default_text(f))} | {cell(f.description or '')} |")
        else:
            parts.append(f"### `{name}` ({sub.__name__})\n\n{cell(f.description or '')}\n\n{field_table(sub, name + '.')}")
    head = "\n".join(["| field | type | default | description |", "|---|---|---|---|", *top])
    return "\n\n".join([head, *parts]) + "\n"


def block_train_config() -> str:
    from locaudit.edit.config import TrainConfig

    return field_table(TrainConfig) + "\n"


def block_eval_config() -> str:
    from locaudit.evaluate.runner import EvalConfig

    return field_table(EvalConfig) + "\n"


def _commands() -> list[tuple[str, str]]:
    """(`locaudit NAME [SUB]`, first paragraph of its help) for every command, in registration order."""
    import typer

    from locaudit.cli.main import app

    def first_par(text: str | None) -> str:
        text = (text or "").replace("\b", "").strip()
        return " ".join(re.split(r"\n\s*\n", text, maxsplit=1)[0].split())

    out = []

    def walk(cmd: Any, path: str) -> None:  # a click group (typer may vendor its own click): by its `commands`
        for name, sub in getattr(cmd, "commands", {}).items():
            if not getattr(sub, "hidden", False):
                out.append((f"{path} {name}", first_par(sub.help or sub.short_help)))
                walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "locaudit")
    return out


def block_cli() -> str:
    rows = [f"| `{name}` | {cell(help_)} |" for name, help_ in _commands()]
    return "\n".join(["| command | what it does (first paragraph of `--help`) |", "|---|---|", *rows]) + "\n"


def block_families() -> str:
    from locaudit.models.sites import SITES

    rows = [f"| `{fam}` | `{s.layers}` | `{s.o_proj}` | {f'`{s.mlp_down}`' if s.mlp_down else 'none'} | "
            f"{'yes' if s.conv1d else 'no'} | {'yes' if s.prefix else 'no'} |" for fam, s in SITES.items()]
    return "\n".join([f"{len(SITES)} families (`config.model_type`), each built as a tiny random model in the tests:", "",
                      "| family | layers | o_proj (per layer) | MLP down-projection | Conv1D weights | frozen prefix |",
                      "|---|---|---|---|---|---|", *rows]) + "\n"


def n_test_questions(spec: Any) -> int | None:
    """The number of questions the verdict is reported on, from the data file's known size (QUESTIONS) and
    the study's subsample, split and evaluation cap: what `locaudit run --dry-run` counts from the file."""
    from locaudit.data.splits import split_sizes

    d, ev = spec.data, spec.evaluation
    path = spec.resolved_data_spec().partition(":")[2].replace("\\", "/")
    n = next((v for k, v in QUESTIONS.items() if path.endswith("/" + k)), None)
    if d.max_questions is not None:
        n = min(n, d.max_questions) if n is not None else d.max_questions
    if n is None:
        return ev.max_questions
    n = split_sizes(n, d.fractions)[("train", "val", "test").index(ev.split)]
    return min(n, ev.max_questions) if ev.max_questions else n


def study_design(path: Path) -> dict:
    """What `locaudit run PATH --dry-run` computes before anything ran: trial counts by kind and the design
    checks (study/design.py), for the environment's defaults of ${VAR}s (STUDY_ENV unset)."""
    from locaudit.study.design import design
    from locaudit.study.spec import load_study
    from locaudit.study.trials import KINDS, expand

    saved = {k: os.environ.pop(k) for k in STUDY_ENV if k in os.environ}
    try:
        spec = load_study(path)
        trials = expand(spec)
        nq = n_test_questions(spec)
    finally:
        os.environ.update(saved)
    counts: dict[str, int] = {}
    for t in sorted(trials, key=lambda t: KINDS.index(t.kind) if t.kind in KINDS else len(KINDS)):
        counts[t.kind] = counts.get(t.kind, 0) + 1
    d = design(spec, None, nq)
    S = spec.localizers.single
    singles = S.n + getattr(S, "top", 0) + len(S.heads)  # sampled, the probe's best N, listed
    return {"spec": spec, "trials": len(trials), "counts": counts, "design": d, "n_questions": nq,
            "single_heads": singles}


def _best_outcome(c: dict) -> str:
    if not c["in_family"]:
        return f"none: the floor cannot pass its threshold (needs >= {c['draws_needed_for_floor']} draws)"
    if c["floor_only"]:
        return f"'suggestive' at best (evidence needs >= {c['draws_beyond_floor']} draws)"
    return "evidence for"


def block_study_designs() -> str:
    rows = []
    for path in study_files():
        s = study_design(path)
        d = s["design"]
        counts = ", ".join(f"{n} {k}" for k, n in s["counts"].items())
        nq = f"{s['n_questions']} ({s['spec'].evaluation.split})" if s["n_questions"] else "?"
        first = f"| `studies/{path.name}` | {s['trials']} ({counts}) | {nq} |"
        if not d["comparisons"]:
            rows.append(first + " - | no top-K vs random comparison | | | | |")
        for i, c in enumerate(d["comparisons"]):
            lead = first if i == 0 else "| | | |"
            thr = f"{c['threshold']:.3g}" if c["threshold"] else "-"
            shift = (f"{c['detectable_shift_sd']:.2f} sd at {d['power']:.0%} power" if c["detectable_effect"] is not None
                     else "-")
            rows.append(f"{lead} {c['method']} | {c['n_random']} draws, floor {c['p_floor']:.3g}, threshold {thr} | "
                        f"{cell(_best_outcome(c))} | {shift} | {c['equivalence_power']:.0%} | "
                        f"{cell(c['equivalence_needs'])} |")
    return "\n".join([
        "| study | trials (by kind) | questions scored | comparison | rank test | best outcome | detectable shift | "
        "equivalence power | equivalence needs |",
        "|---|---|---|---|---|---|---|---|---|", *rows]) + "\n"


# ------------------------------------------------------------------------------------------- measurements
class MeasurementError(ValueError):
    """A measurement file that is not what `make docs` can render; the message names the file and field."""


def _no_nan(token: str) -> float:
    raise ValueError(f"{token} is not strict JSON (write null)")


def load_measurement(path: Path) -> dict:
    """A docs/measurements/*.json file, checked: strict JSON, the schema, a complete provenance of its kind,
    a table whose rows have one text cell per column."""
    where = str(path)
    try:
        rec = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_nan)
    except (OSError, ValueError) as e:
        raise MeasurementError(f"{where}: {e}") from e
    if not isinstance(rec, dict) or rec.get("schema") != SCHEMA:
        raise MeasurementError(f"{where}: schema must be {SCHEMA!r}")
    prov = rec.get("provenance")
    kind = prov.get("kind") if isinstance(prov, dict) else None
    if kind not in PROVENANCE:
        raise MeasurementError(f"{where}: provenance.kind must be one of {sorted(PROVENANCE)}, not {kind!r}")
    for key in PROVENANCE[kind]:
        value = prov.get(key)
        if kind == "run" and key == "commit" and key in prov:
            continue  # None outside a git checkout: recorded as unknown
        if value is None or value == "" or (key == "threads" and not isinstance(value, int)):
            raise MeasurementError(f"{where}: provenance.{key} is missing or empty (a {kind} must state it)")
    if not re.match(r"^\d{4}-\d{2}-\d{2}", str(prov["date"])):
        raise MeasurementError(f"{where}: provenance.date {prov['date']!r} is not an ISO date")
    tab = rec.get("table")
    cols = tab.get("columns") if isinstance(tab, dict) else None
    rows = tab.get("rows") if isinstance(tab, dict) else None
    if not (isinstance(cols, list) and cols and all(isinstance(c, str) for c in cols) and isinstance(rows, list)):
        raise MeasurementError(f"{where}: table needs columns (a list of text) and rows (a list)")
    for i, r in enumerate(rows):
        if not (isinstance(r, list) and len(r) == len(cols) and all(isinstance(c, str) for c in r)):
            raise MeasurementError(f"{where}: table.rows[{i}] needs {len(cols)} text cells ({cols})")
    notes = rec.get("notes", [])
    if not (isinstance(notes, list) and all(isinstance(n, str) for n in notes)):
        raise MeasurementError(f"{where}: notes must be a list of text")
    return rec


def measurement_files(root: Path = ROOT) -> list[Path]:
    return sorted((root / MEASUREMENTS).glob("*.json"))


def source_line(rel: str, rec: dict) -> str:
    """Where, when and how a file's figures were measured, in one sentence."""
    p = rec["provenance"]
    if p["kind"] == "run":
        commit = f"commit {p['commit'][:12]}{'+dirty' if p['commit'].endswith('+dirty') else ''}" if p.get("commit") \
            else "no git commit recorded"
        load = f", load {p['cpu_load_at_start']} at start" if p.get("cpu_load_at_start") is not None else ""
        peak = f", fp32 GEMM peak {p['fp32_gemm_peak_gflops']} GFLOP/s" if p.get("fp32_gemm_peak_gflops") else ""
        model = (rec.get("results") or {}).get("model")
        return (f"`{rel}`: `{p['command']}` on {p['date']}, {p['machine']}; CPU capability {p['cpu_capability']}, "
                f"{p['precision']}, torch {p['torch']}, threads {p['threads']}{load}{peak}"
                f"{f', model {model}' if model else ''}; {commit}.")
    said = [x for x in (p["cpu_capability"] != NOT_STATED and f"CPU capability {p['cpu_capability']}",
                        p["precision"] != NOT_STATED and p["precision"]) if x]
    where = (f"measured on {p['machine']} ({', '.join(said) or 'capability and precision not stated'})"
             if p["machine"] != NOT_STATED else
             f"machine not stated{' (' + ', '.join(said) + ')' if said else ', nor CPU capability or precision'}")
    return f"`{rel}`: transcribed, not re-run: {p['source']}; {where}, on or before {p['date']}. {p['note']}"


def _when(rec: dict) -> str:
    p = rec["provenance"]
    return f"{p['cpu_capability']}, {p['precision']}, {str(p['date'])[:10]}" + (
        " (transcribed)" if p["kind"] == "transcribed" else "")


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns),
                      *("| " + " | ".join(cell(c) for c in r) + " |" for r in rows)])


def block_bench(root: Path = ROOT) -> str:
    """The README's benchmark table: the rows of every benchmark's measurement file, with where and when each
    ran, and the sources below it; a benchmark without a file is named as not measured."""
    rows, sources, missing, columns = [], [], [], None
    for name in BENCHMARKS:
        path = root / MEASUREMENTS / f"{name}.json"
        if not path.exists():
            missing.append(f"`benchmarks/{name}.py`")
            continue
        rec = load_measurement(path)
        if columns is None:
            columns = rec["table"]["columns"]
        elif rec["table"]["columns"] != columns:
            raise MeasurementError(f"{path}: table.columns {rec['table']['columns']} differ from the other "
                                   f"benchmarks' {columns}")
        rows += [[*r, _when(rec)] for r in rec["table"]["rows"]]
        sources.append(f"- {source_line(f'{MEASUREMENTS}/{name}.json', rec)}")
    parts = [markdown_table([*(columns or ["benchmark"]), "CPU, precision, date"], rows)] if rows else []
    parts.append("Sources:\n\n" + "\n".join(sources) if sources else "No benchmark measured here yet.")
    if missing:
        parts.append(f"Not measured in this repository yet: {', '.join(missing)} (`make bench` writes "
                     f"`{MEASUREMENTS}/NAME.json`, `make docs` adds it here).")
    return "\n\n".join(parts) + "\n"


def block_measured(name: str, root: Path = ROOT) -> str:
    """The table of docs/measurements/NAME.json, its notes and its source."""
    rel = f"{MEASUREMENTS}/{name}.json"
    rec = load_measurement(root / rel)
    parts = [markdown_table(rec["table"]["columns"], rec["table"]["rows"])]
    if rec.get("notes"):
        parts.append("\n".join(f"- {n}" for n in rec["notes"]))
    parts.append(f"Source: {source_line(rel, rec)}")
    return "\n\n".join(parts) + "\n"


def known_block(name: str, root: Path = ROOT) -> bool:
    if name.startswith("measured."):
        return (root / MEASUREMENTS / f"{name.removeprefix('measured.')}.json").is_file()
    return name in BLOCKS


BLOCKS: dict[str, Callable[[], str]] = {
    "cli": block_cli,
    "study-spec": block_study_spec,
    "train-config": block_train_config,
    "eval-config": block_eval_config,
    "families": block_families,
    "study-designs": block_study_designs,
    "bench": block_bench,
}


# ------------------------------------------------------------------------------------------------- render
@functools.lru_cache(maxsize=None)
def _source_body(name: str) -> str:
    return BLOCKS[name]()


def body(name: str, root: Path = ROOT) -> str:
    """A generated part's text: from the source (computed once per process), or from `root`'s measurement
    files (read every time, so that a check sees an edited file)."""
    if name == "bench":
        return block_bench(root)
    if name.startswith("measured."):
        return block_measured(name.removeprefix("measured."), root)
    return _source_body(name)


def render(text: str, bodies: dict[str, str], where: str = "") -> str:
    """`text` with every generated part's body replaced by bodies[NAME]; an unknown NAME is an error."""

    def sub(m: re.Match) -> str:
        name = m.group("name")
        if name not in bodies:
            raise KeyError(f"{where}: <!-- generated:{name} --> is not one of {sorted(bodies)}")
        return m.group("open") + bodies[name] + m.group("close")

    return BLOCK.sub(sub, text)


def generated_names(text: str) -> list[str]:
    return [m.group("name") for m in BLOCK.finditer(text)]


def stale(root: Path = ROOT) -> dict[Path, tuple[str, str]]:
    """{file: (committed text, generated text)} for every doc file whose generated parts are out of date."""
    files = {p: p.read_text(encoding="utf-8") for p in doc_files(root)}
    names = {n for t in files.values() for n in generated_names(t)}
    bodies = {n: body(n, root) for n in sorted(names) if known_block(n, root)}
    out = {}
    for p, text in files.items():
        new = render(text, bodies, str(p.relative_to(root)))
        if new != text:
            out[p] = (text, new)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when a generated part is stale")
    args = ap.parse_args(argv)
    try:
        todo = stale()
    except MeasurementError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p, (_, new) in todo.items():
        rel = p.relative_to(ROOT)
        if args.check:
            print(f"stale: {rel} (run `make docs`)")
        else:
            p.write_text(new, encoding="utf-8")
            print(f"wrote {rel}")
    return 1 if args.check and todo else 0


if __name__ == "__main__":
    sys.exit(main())
