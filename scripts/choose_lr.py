"""Choose the optimal edit's learning rate from a validation sweep, and apply it to study files.

    python scripts/choose_lr.py runs/answer-smollm2-lr                       # the table and the choice
    python scripts/choose_lr.py runs/answer-gemma3-lr --apply studies/answer_gemma3_pilot.yaml \
        --apply studies/answer_gemma3.yaml --out-dir runs/derived           # copies with the chosen rate

The sweep (e.g. studies/answer_smollm2_lr.yaml) trains full alignment (the optimal edit at all heads) at several
learning rates and scores each, and the unedited model, on the VALIDATION split. The rule, fixed before any
result: the rate with the highest validation score on the primary metric (MC2 unless --metric) is chosen, and
used for EVERY location (top, random, single heads, all heads), so the candidate and its controls are tuned
alike and nothing is tuned on test. The table gives each rate's gain over the unedited model with its paired
standard error over questions (a gain is "measurable" when it is at least twice that SE). A choice at the edge
of the grid is flagged: the best rate may lie beyond it.

`--apply FILE` writes FILE's copy to --out-dir (same name), or FILE itself with --in-place, with `optimal.lr` set
to the chosen rate for every group, the rest of the file (comments included) unchanged; `--json` prints the choice as one JSON object.
Exit status 1 when the sweep has no finished full-alignment trial on the validation split, or its gain is not
measurable.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from locaudit.study.frames import load_per_question, trials_frame  # noqa: E402
from locaudit.study.ledger import Ledger  # noqa: E402

MEASURABLE_SE = 2.0  # a gain counts as measurable at >= this many paired standard errors


def sweep_table(run_dir: Path, metric: str) -> tuple[list[dict], float, int]:
    """Per learning rate of the all-heads edits: {lr, score, gain, se, n}; the unedited score; questions."""
    with Ledger(run_dir) as ledger:
        rows = ledger.rows(status="done")
    df = trials_frame(rows)
    base = df[df["kind"] == "baseline"]
    alls = df[(df["kind"] == "optimal") & (df["group"] == "all")]
    if base.empty or alls.empty:
        raise SystemExit(f"{run_dir}: the sweep needs a finished baseline and >= 1 finished optimal edit at all "
                         f"heads (found {len(base)} and {len(alls)})")
    per = load_per_question(run_dir, rows)
    b_key = base["key"].iloc[0]
    b = per.get(b_key, {}).get(metric)
    if not b:
        raise SystemExit(f"{run_dir}: the baseline trial {b_key} has no per-question {metric!r} "
                         f"(mc_items.jsonl); was the sweep evaluated with metrics [mc]?")
    out = []
    for r in alls.sort_values("lr").to_dict("records"):
        e = per.get(r["key"], {}).get(metric, {})
        qs = sorted(set(e) & set(b))
        d = [e[q] - b[q] for q in qs]
        n = len(d)
        mean = sum(d) / n if n else float("nan")
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else float("nan")
        out.append({"lr": float(r["lr"]), "tau": r["tau"], "score": sum(e[q] for q in qs) / n if n else float("nan"),
                    "gain": mean, "se": sd / math.sqrt(n) if n > 1 else float("nan"), "n": n,
                    "steps": _best_step(run_dir, r.get("edit_dir"))})
    return out, sum(b.values()) / len(b), len(b)


def _best_step(run_dir: Path, edit_dir) -> int | None:
    """The optimizer step early stopping kept (the edit's trained.json), where recorded."""
    if not edit_dir:
        return None
    d = run_dir / edit_dir
    for f in (d / "trained.json", d.parent / "trained.json"):
        try:
            best = json.loads(f.read_text()).get("best") or {}
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(best, dict) and "step" in best:
            return int(best["step"])
    return None


def choose(table: list[dict]) -> dict:
    """The rule: the highest validation score; flags an edge choice and an unmeasurable gain."""
    ok = [r for r in table if math.isfinite(r["score"])]
    best = max(ok, key=lambda r: r["score"])
    lrs = sorted(r["lr"] for r in ok)
    edge = len(lrs) > 1 and best["lr"] in (lrs[0], lrs[-1])
    measurable = bool(math.isfinite(best["se"]) and best["gain"] >= MEASURABLE_SE * best["se"] and best["gain"] > 0)
    return {**best, "at_edge": edge, "measurable": measurable, "grid": lrs}


def apply_lr(text: str, lr: float, name: str) -> str:
    """The study file's text with optimal.lr set to `lr` for every group (one flow-style `lr:` line under
    `optimal:`, as the shipped study files write it)."""
    m = re.search(r"^optimal:\s*\n((?:[ \t]+.*\n|\s*\n)*)", text, flags=re.M)
    if not m:
        raise SystemExit(f"{name}: no `optimal:` section")
    block = m.group(1)
    new_line = f"  lr: {{top: [{lr:.4g}], random: [{lr:.4g}], single: [{lr:.4g}], all: [{lr:.4g}]}}"
    block2, n = re.subn(r"^[ \t]+lr:[ \t]*\{.*\}.*$", new_line + "   # chosen on the validation split (scripts/choose_lr.py)",
                        block, count=1, flags=re.M)
    if n != 1:
        raise SystemExit(f"{name}: optimal.lr is not a one-line mapping; set it by hand to {lr:.4g}")
    return text[:m.start(1)] + block2 + text[m.end(1):]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="the sweep's run folder")
    ap.add_argument("--metric", default="mc2", help="per-question metric to choose on (default mc2)")
    ap.add_argument("--apply", action="append", type=Path, default=[], help="study file to copy with the rate")
    ap.add_argument("--out-dir", type=Path, help="where --apply writes its copies (relative paths in a copy, such as "
                    "the data default, then resolve against --out-dir: set LOCAUDIT_DATA)")
    ap.add_argument("--in-place", action="store_true", help="--apply rewrites the study files themselves")
    ap.add_argument("--json", action="store_true", help="print the choice as JSON")
    a = ap.parse_args(argv)
    if a.apply and (a.out_dir is None) == (not a.in_place):
        ap.error("--apply needs exactly one of --out-dir and --in-place")
    table, base, nq = sweep_table(a.run, a.metric)
    c = choose(table)
    if a.json:
        print(json.dumps({"metric": a.metric, "unedited": base, "n_questions": nq, "table": table, "chosen": c}))
    else:
        print(f"{a.run}: full alignment on the validation split ({nq} questions), {a.metric}; unedited {base:.4f}")
        print(f"{'lr':>10} {'score':>8} {'gain':>8} {'SE':>7} {'best step':>9}")
        for r in table:
            mark = "  <- chosen" if r["lr"] == c["lr"] else ""
            print(f"{r['lr']:>10.4g} {r['score']:>8.4f} {r['gain']:>+8.4f} {r['se']:>7.4f} {str(r['steps']):>9}{mark}")
        print(f"chosen lr {c['lr']:.4g}: gain {c['gain']:+.4f} +- {c['se']:.4f} "
              f"({'measurable' if c['measurable'] else 'NOT measurable'} at {MEASURABLE_SE:g} SE)"
              + ("; at the edge of the grid: the best rate may lie beyond it" if c["at_edge"] else ""))
    if a.apply:
        if a.out_dir is not None:
            a.out_dir.mkdir(parents=True, exist_ok=True)
        for f in a.apply:
            dest = f if a.in_place else a.out_dir / f.name
            text = apply_lr(f.read_text(), c["lr"], str(f))
            tmp = dest.with_name(dest.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(dest)  # atomic: a study file is never half written
            print(f"wrote {dest}")
    return 0 if c["measurable"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
