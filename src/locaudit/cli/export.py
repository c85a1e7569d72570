"""`locaudit export`: turn any saved edit into a model others can load without locaudit.

Sources: an edit folder (written by `locaudit iti`, `locaudit edit` or a study), or a study run folder
plus `--trial KEY` (a key, a unique key prefix or a trial name; the trial's edit folder is found in the
run's ledger, or in trials/KEY/result.json). Outputs: a merged HF model folder (`--format merged`), a
PEFT adapter (`--format peft`) or both, in OUT/merged and OUT/peft (written together beside OUT and
swapped in as one unit: both or neither).
"""

from __future__ import annotations

import json
import logging
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from locaudit.cli import options as opt
from locaudit.cli.options import DType, device_option, dtype_option, value

log = logging.getLogger(__name__)

EXAMPLE = (
    "Examples:\n\n"
    "  locaudit export runs/edit_top16 --out exports/top16                 # merged + PEFT adapter\n\n"
    "  locaudit export runs/quickstart --trial 3f2a --format merged --out exports/t3f2a\n\n"
    "Reload: AutoModelForCausalLM.from_pretrained('exports/top16/merged'), or "
    "PeftModel.from_pretrained(base_model, 'exports/top16/peft')."
)


class Format(str, Enum):
    merged = "merged"
    peft = "peft"
    both = "both"


def is_run_dir(path: Path) -> bool:
    """A study run folder (a ledger or trial folders), not an edit folder (meta.json)."""
    from locaudit.study.rundir import RunDir

    return path.is_dir() and not (path / "meta.json").exists() and RunDir(path).is_run()


def trial_edit_dir(run_dir: str | Path, trial: str) -> tuple[Path, dict]:
    """(edit folder, ledger row or record) of the trial of `run_dir` named by `trial` (key, unique key
    prefix or trial name). Raises ConfigError naming the trials that have edits when none matches."""
    from locaudit.errors import ConfigError
    from locaudit.study.ledger import Ledger, artifact_dir, read_trial_record
    from locaudit.study.rundir import RunDir

    run_dir = Path(run_dir)
    rows: list[dict] = []
    try:
        with Ledger(run_dir) as led:
            rows = led.rows(in_spec_only=False)
    except ConfigError:
        for key in RunDir(run_dir).recorded_keys():
            rec, _ = read_trial_record(run_dir, key)
            if rec is not None:
                rows.append(rec)
    def has_edit(r: dict) -> bool:
        return isinstance(r.get("artifacts"), dict) and bool(r["artifacts"].get("edit"))

    def listed(rs: list[dict]) -> str:  # every candidate, never a silent cut
        return f"{len(rs)}: " + ", ".join(f"{r['key'][:10]} ({r.get('name')})" for r in rs) if rs else "none"

    with_edit = [r for r in rows if has_edit(r)]
    match = [r for r in rows if r.get("key") == trial or r.get("name") == trial]
    if not match:  # a key prefix or a name prefix; among several, the one trial with an edit
        match = [r for r in rows if trial and (str(r.get("key", "")).startswith(trial)
                                               or str(r.get("name") or "").startswith(trial))]
        if len(match) > 1 and sum(map(has_edit, match)) == 1:
            match = [r for r in match if has_edit(r)]
    listing = listed(with_edit)
    if len(match) != 1:
        if match:
            raise ConfigError(f"{run_dir}: {len(match)} trials match {trial!r} (by key or name prefix): "
                              f"{listed(match).split(': ', 1)[1]}; give more of the key or the full name")
        raise ConfigError(f"{run_dir}: no trial matches {trial!r} (a key, a key prefix, a name or a name prefix); "
                          f"trials with an edit, {listing}")
    row = match[0]
    edit = (row.get("artifacts") or {}).get("edit")
    if not edit:
        status = row.get("status", "?")
        raise ConfigError(f"{run_dir}: trial {row['key']} ({row.get('name')}, {status}) has no edit folder "
                          f"(not an edit trial, or not finished); trials with an edit, {listing}")
    d = artifact_dir(run_dir, edit)
    if d is None or not d.is_dir():
        raise ConfigError(f"{run_dir}: trial {row['key']}'s edit folder {edit!r} is missing")
    return d, row


def _study_model(run_dir: Path) -> str | None:
    """The model the run's recorded study spec names; None where the run records no readable spec, or a spec
    that does not name its model (the edit's own record then says which model it was made on)."""
    from locaudit.errors import ConfigError
    from locaudit.study.ledger import Ledger
    from locaudit.study.spec import spec_of_run

    try:
        with Ledger(run_dir) as led:
            spec = spec_of_run(led.get_meta("spec", {}), f"{run_dir}: the ledger's study spec")
    except ConfigError:
        return None
    return spec.model.name if "model" in spec.model_fields_set else None


def _recorded_model(edit) -> str | None:
    model = getattr(edit, "model", None)
    if not isinstance(model, dict):
        model = (getattr(edit, "meta", None) or {}).get("model")
    name = model.get("name") if isinstance(model, dict) else None
    return name or None


def load_named_model(name: str, dtype: str = "fp32", device: str = "cpu", trust_remote_code: bool = False):
    """load_model (which also reads `tiny:FAMILY[:SEED]`, models/loading.py's one parser)."""
    from locaudit.models.loading import load_model

    return load_model(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def export_command(
    source: Path = typer.Argument(..., help="An edit folder (meta.json + iti.safetensors or edit.safetensors), "
                                  "or a study run folder (with --trial)."),
    out: Path = typer.Option(..., "--out", help="Output folder: OUT/merged (HF model) and/or OUT/peft (adapter); "
                             "with one --format, OUT itself."),
    trial: Optional[str] = typer.Option(None, "--trial", help="With a run folder: the trial's key, a unique "
                                        "key prefix, or its name (see the run's ledger/trials.csv)."),
    fmt: Format = typer.Option(Format.both, "--format", help="merged (a HF folder with the edit folded in: "
                               "LoRA into o_proj's weights, ITI as an o_proj bias its config declares), peft "
                               "(a LoRA adapter; ITI as lora_bias) or both.", case_sensitive=False),
    model: Optional[str] = typer.Option(None, "--model", help="Base model; default: the study's model (run "
                                        "folder) or the model recorded in the edit."),
    allow_mismatch: bool = typer.Option(False, "--allow-model-mismatch", help="Export even if the model's "
                                        "fingerprint differs from the one the edit was made on (a warning)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder; the new export is written beside it and swapped in only once "
                                   "complete, so a failed or killed export leaves the old one whole."),
    dtype: DType = dtype_option(),
    device: str = device_option(),
    trust_remote_code: bool = opt.trust_remote_code_option(),
    json_out: bool = typer.Option(False, "--json", help="Print one strict JSON object (edit, model, fingerprint, "
                                  "written folders, how the adapter merges) instead of text."),
) -> None:
    """Export an edit (ITI, optimal LoRA, or none) as a merged HF model and/or a PEFT adapter."""
    from locaudit.edit.base import load_edit
    from locaudit.edit.export import check_target, export_both, export_merged, export_peft
    from locaudit.errors import ConfigError
    from locaudit.models.loading import resolve_device

    source = Path(source)
    if not source.exists():
        raise ConfigError(f"{source} does not exist: give an edit folder or a study run folder")
    study_model = None
    if is_run_dir(source):
        if trial is None:
            try:
                trial_edit_dir(source, "\0")
            except ConfigError as e:
                raise ConfigError(f"{source} is a study run folder: pass --trial KEY ({str(e).split('; ', 1)[-1]})")
        edit_dir, row = trial_edit_dir(source, trial)
        study_model = _study_model(source)
        if not json_out:
            typer.echo(f"trial {row['key']} ({row.get('name')}): edit {edit_dir}")
    else:
        if trial is not None:
            raise ConfigError(f"--trial is for a study run folder; {source} is an edit folder")
        edit_dir = source
    edit = load_edit(edit_dir)
    name = model or study_model or _recorded_model(edit)
    if not name:
        raise ConfigError(f"{edit_dir}: the edit records no model name; pass --model")
    lm = load_named_model(name, value(dtype), str(resolve_device(device)), trust_remote_code)
    check = "warn" if allow_mismatch else "error"
    if fmt == Format.both:  # one unit: OUT gets both new exports, or keeps what it held
        written = {f: str(p) for f, p in export_both(edit, lm, out, overwrite=overwrite, check=check).items()}
    else:
        f = value(fmt)
        check_target(Path(out), overwrite)  # refuse before any work
        fn = export_merged if f == "merged" else export_peft
        written = {f: str(fn(edit, lm, Path(out), overwrite=overwrite, check=check))}
    if not json_out:
        for f, folder in written.items():
            typer.echo(f"{f}: {folder}")
    from locaudit.edit.export import read_export_meta

    merge = read_export_meta(written["peft"]).get("merge") if "peft" in written else None
    if json_out:
        from locaudit.io import strict_json

        typer.echo(json.dumps(strict_json({"edit": edit.describe(), "model": name, "fingerprint": lm.fingerprint,
                                           **written, **({"peft_merge": merge} if merge else {})}),
                              default=str, allow_nan=False))
    elif merge:
        typer.echo(f"merge the adapter: {merge}")


def register(app: typer.Typer) -> None:
    app.command("export", help=(export_command.__doc__ or "") + "\n\n" + (__doc__ or "").split("\n\n", 1)[1]
                + "\n\n" + EXAMPLE)(export_command)
