"""A finished trial's record and artifact folders: the one validation of metrics (`nonfinite_metrics`),
the checksums that seal a trial's artifact folders, the staging folder a trial's results are written into
and put in place whole, and ``trials/KEY/result.json``, from which `ledger.repair` rebuilds a ledger."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from locaudit.io import (TEMP_RE, follow_umask, has_checksums, replace_path, verify_checksums, write_checksums,
                         write_json_atomic)
from locaudit.study.rundir import RunDir
from locaudit.study.trials import Trial

ARTIFACT_DIRS = ("activations", "probe", "edit", "eval", "data")  # artifact entries that are folders of the run
# ("data": a Hase trial's trials/KEY/data, study/hase/run.py)


# the largest |metric| a trial may record. 2^53 ~ 9e15 is where float64 (and any JSON reader that reads numbers as
# doubles) stops holding every integer, so counts would round silently; squares and sums over trials (variances,
# bootstrap means) of values this size stay finite. A genuine metric is orders of magnitude below it: rates and
# True/Info in [0, 1], KL/CE in nats per token (bounded by the logit range), log-prob sums of one answer, token
# counts, seconds, Unix times (~2e9). A trial whose metric is beyond it is failed and runs again with --retry-failed
METRIC_BOUND = 1e15


def metric_problem(value: Any) -> str | None:
    """Why `value` cannot be a recorded metric (None if it can): a metric is a real number (not a bool, a
    string or null), finite, with |value| <= METRIC_BOUND."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"not a number ({type(value).__name__})"
    if not math.isfinite(value):
        return "not finite"
    if abs(value) > METRIC_BOUND:
        return f"beyond +-{METRIC_BOUND:g}"
    return None


def nonfinite_metrics(metrics: Any) -> list[tuple[str, Any]]:
    """(name, value) of every metric that cannot be recorded (`metric_problem`): NaN, +-inf, |value| above
    METRIC_BOUND, or not a number at all. The one validation of metrics, applied by the runner when it
    records a trial, by `Ledger.finish`, and by `repair` to every result.json it would restore."""
    if not isinstance(metrics, dict):
        return [("metrics", metrics)]
    return [(str(k), v) for k, v in sorted(metrics.items(), key=lambda kv: str(kv[0]))
            if not isinstance(k, str) or metric_problem(v) is not None]


invalid_metrics = nonfinite_metrics


def nonfinite_message(trial: Trial, bad: list[tuple[str, float]]) -> str:
    """Why a trial with non-finite metrics fails: the trial, the values and the likely cause."""
    g = trial.grid
    causes = {
        "iti": f"the ITI strength alpha={g.get('alpha')!r} or non-finite activations in the collect folder",
        "optimal": f"training diverged: learning rate lr={g.get('lr')!r} (tau={g.get('tau')!r}) is likely too high",
        "probe": "non-finite head activations (the collect folder or the model's dtype)",
        "collect": "the model produces non-finite activations (its weights or dtype)",
        "baseline": "the model produces non-finite log-probs (its weights or dtype)",
    }
    shown = ", ".join(f"{k} = {v!r}" if not isinstance(v, float) else f"{k} = {v}" for k, v in bad[:6])
    return (f"trial {trial.key} ({trial.name}): non-finite or invalid metric(s) {shown}; likely cause: "
            f"{causes.get(trial.kind, 'non-finite inputs')}. The trial is failed, nothing of it is kept as done.")


def artifact_dir(run_dir: Path, value: Any) -> Path | None:
    """The folder an artifact entry names, if it is a relative path inside the run folder."""
    if not isinstance(value, str) or not value or Path(value).is_absolute():
        return None
    p = run_dir / value
    try:
        p.resolve().relative_to(run_dir.resolve())
    except ValueError:
        return None
    return p


def check_artifacts(run_dir: Path, artifacts: dict, strict: bool = False) -> str | None:
    """None if a trial's artifact folders are intact (their checksums match); else what is wrong.
    A folder without a manifest (written before checksums existed) passes unless `strict`."""
    for k in ARTIFACT_DIRS:
        if k not in artifacts:
            continue
        d = artifact_dir(Path(run_dir), artifacts[k])
        if d is None:
            return f"artifact {k}: {artifacts[k]!r} is not a folder of the run"
        if not d.is_dir():
            return f"artifact {k}: {d} is missing"
        if strict or has_checksums(d):
            problem = verify_checksums(d)
            if problem:
                return f"artifact {k}: {problem}"
    return None


def seal_artifacts(run_dir: Path, artifacts: dict, staged: dict[Path, Path] | None = None) -> None:
    """Write the checksums of a finished trial's artifact folders (after every file in them is written);
    an artifact under a staged folder (`staged`: final folder -> its staging folder) is sealed where it is."""
    for k in ARTIFACT_DIRS:
        d = artifact_dir(Path(run_dir), artifacts.get(k))
        if d is not None:
            d = _staged_path(d, staged)
        if d is not None and d.is_dir():
            write_checksums(d)


def _staged_path(p: Path, staged: dict[Path, Path] | None) -> Path:
    """Where `p` (a path of the run) is while its trial folder is still staged."""
    for final, tmp in (staged or {}).items():
        try:
            return tmp / p.relative_to(final)
        except ValueError:
            continue
    return p


def staged_trial_folders(run_dir: Path, trial: Trial, staged: Any) -> dict[Path, Path]:
    """{final folder: staging folder} of a trial's result (`Outcome.staged`: relative paths, as the worker's
    RunContext built them). Only the trial's own folder trials/KEY, staged as a recognised temporary sibling
    (`io.staging_dir`) that exists, is accepted; anything else is a ValueError naming it."""
    run_dir = Path(run_dir)
    out: dict[Path, Path] = {}
    if not staged:
        return out
    if not isinstance(staged, dict):
        raise ValueError(f"trial {trial.key}: staged folders {staged!r} are not a mapping")
    for final_rel, tmp_rel in staged.items():
        final, tmp = artifact_dir(run_dir, final_rel), artifact_dir(run_dir, tmp_rel)
        m = TEMP_RE.match(tmp.name) if tmp is not None else None
        if (final is None or tmp is None or final != RunDir(run_dir).trial(trial.key) or tmp.parent != final.parent
                or m is None or m.group("name") != final.name):
            raise ValueError(f"trial {trial.key}: staged folder {tmp_rel!r} for {final_rel!r} is not its trial "
                             "folder's staging folder")
        if not tmp.is_dir():
            raise ValueError(f"trial {trial.key}: its staged folder {tmp} is missing (a run folder that the "
                             "worker and the driver do not share?)")
        out[final] = tmp
    return out


def commit_trial_folders(staged: dict[Path, Path]) -> None:
    """Put each complete staged trial folder in place of its final folder, whole (`io.replace_path`: an
    earlier attempt's folder stays until the new one is in place)."""
    for final, tmp in staged.items():
        follow_umask(tmp)
        replace_path(tmp, final)


def discard_trial_folders(staged: dict[Path, Path]) -> None:
    """Remove the staging folders of a trial that failed; its final folder (if any) is left as it was."""
    for tmp in staged.values():
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def write_trial_record(run_dir: Path, trial: Trial, status: str, metrics: dict, artifacts: dict,
                       started: float | None, finished: float | None, worker: str | None,
                       cpu_s: float | None, staged: dict[Path, Path] | None = None) -> Path:
    """trials/KEY/result.json: a finished trial's result, what `repair` rebuilds a ledger from (written into
    the trial's staging folder where `staged` has one, which is then put in place whole)."""
    out = _staged_path(RunDir(run_dir).record(trial.key), staged)
    write_json_atomic(out, {"key": trial.key, "kind": trial.kind, "name": trial.name, "status": status,
                            "metrics": metrics, "artifacts": artifacts, "started": started,
                            "finished": finished, "worker": worker, "cpu_s": cpu_s})
    return out


def read_trial_record(run_dir: Path, key: str) -> tuple[dict | None, str]:
    """(record, "") from trials/KEY/result.json, or (None, why not)."""
    path = RunDir(run_dir).record(key)
    if not path.is_file():
        return None, "no result record"
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return None, f"{path} is unreadable ({type(e).__name__})"
    problem = record_problem(rec, key)
    if problem:
        return None, f"{path}: {problem}"
    return rec, ""


def record_problem(rec: Any, key: str) -> str | None:
    """What makes `rec` not a finished trial's record that can be restored (None: it is one): the runner's
    own validation of metrics (`nonfinite_metrics`), artifacts as relative paths, times as numbers."""
    if not isinstance(rec, dict):
        return f"not a JSON object ({type(rec).__name__})"
    if rec.get("key") != key:
        return f"field 'key' is {rec.get('key')!r}, expected {key!r}"
    if rec.get("status") != "done":
        return f"field 'status' is {rec.get('status')!r}, not 'done'"
    bad = nonfinite_metrics(rec.get("metrics"))
    if bad or not isinstance(rec.get("metrics"), dict):
        shown = ", ".join(f"{k} = {v!r}" for k, v in bad[:4])
        return f"field 'metrics' holds values the runner would not record ({shown})"
    arts = rec.get("artifacts")
    if not isinstance(arts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in arts.items()):
        return "field 'artifacts' is not an object of paths"
    for f in ("started", "finished", "cpu_s"):
        v = rec.get(f)
        if v is not None and (metric_problem(v) is not None or v < 0):
            return f"field {f!r} is {v!r}, not a time in seconds"
    if rec.get("worker") is not None and not isinstance(rec.get("worker"), str):
        return f"field 'worker' is {rec.get('worker')!r}, not a string"
    return None
