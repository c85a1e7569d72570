"""A study that is designed but not run yet, as its docs/results.md section (scripts/results_doc.py --planned
NAME=DRYRUN): what it will compare, how well its design can decide, and what it costs here, read from the strict
JSON of `locaudit run STUDY --dry-run --measure --json > DRYRUN`, never typed.

The section has the heading a finished study of the same NAME gets, so rendering that study's report later
(`--study NAME=RUN`) replaces it in place.
"""

from __future__ import annotations

import json
from pathlib import Path

from locaudit.study.cost_probe import measure_text
from locaudit.study.design import design_text


def load_dry_run(path: Path) -> dict:
    """The dry-run's payload, checked for the fields the section reads; a clear error names the file."""
    if not path.is_file():
        raise SystemExit(f"results_doc: --planned {path}: no such file (write it with `locaudit run STUDY --dry-run "
                         "--measure --json > FILE`)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise SystemExit(f"results_doc: --planned {path}: not JSON ({e})") from e
    missing = [k for k in ("study", "counts", "design") if k not in d] + (
        [] if "measured_cost" in d.get("design", {}) else ["design.measured_cost (run the dry-run with --measure)"])
    if missing:
        raise SystemExit(f"results_doc: --planned {path}: missing {', '.join(missing)}")
    return d


GPU = "PARTS=answer bash benchmarks/gpu_check.sh   # on a GPU: the answer studies' sweeps, pilots and studies"


def render_planned(path: Path, heading: str) -> list[str]:
    """The section's lines: heading, status, trial counts, the design checks, the measured cost, how to run it."""
    d = load_dry_run(path)
    des, counts = d["design"], d["counts"]
    status: dict[str, int] = {}
    for t in d.get("trials", []):
        status[t["status"]] = status.get(t["status"], 0) + 1
    spreads = sorted({c.get("spread") for c in des.get("comparisons", []) if c.get("spread")})
    lines = [heading, "",
             f"**Not run yet.** Study `{d['study']}`: {sum(counts.values())} trials ("
             + ", ".join(f"{n} {k}" for k, n in counts.items()) + "); "
             + ", ".join(f"{n} {s}" for s, n in sorted(status.items())) + ". "
             f"From `{path.as_posix()}` (`locaudit run ... --dry-run --measure --json`).", "",
             "### Design and power", "",
             f"Spread of the random draws: {', '.join(spreads) or 'n/a'} (a pilot's observed spread replaces an "
             "assumed one: `--dry-run --pilot`).", "", "```"]
    lines += [ln for ln in design_text(des) if not ln.lstrip().startswith("cost ")]
    lines += ["```", "", "### Cost where it was measured", "", "```"]
    lines += [ln.strip() for ln in measure_text(des["measured_cost"])]
    run = d.get("command") or f"locaudit run STUDY --out {d.get('run_dir', 'RUN')}"
    lines += ["```", "", "To run it: first what its study file's header lists before it (a validation sweep that "
              "chooses the learning rate, a pilot that sizes the design by observed spreads), then (resumable):", "",
              "```bash",
              run, GPU, "```"]
    return lines
