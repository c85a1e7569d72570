"""Issue 28: `run --json --no-report` prints the verdict and writes no report; `--json` on export and eval;
`export --trial` by key or name prefix, listing every candidate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from locaudit.errors import ConfigError
from test_export_cli import STUDY, _pairs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The tiny study of test_export_cli, run through `locaudit run STUDY.yaml --json --no-report`."""
    import os

    d = tmp_path_factory.mktemp("outputs")
    old = os.environ.get("LOCAUDIT_CACHE")
    os.environ["LOCAUDIT_CACHE"] = str(d / "cache")
    _pairs(d / "pairs.jsonl")
    study = d / "tiny-export.yaml"
    study.write_text(yaml.safe_dump(STUDY))
    res = CliRunner().invoke(_app(), ["run", str(study), "--out", str(d / "run"), "--json", "--no-report"],
                             catch_exceptions=False)
    yield d, res
    if old is None:
        os.environ.pop("LOCAUDIT_CACHE", None)
    else:
        os.environ["LOCAUDIT_CACHE"] = old


def _app():
    from locaudit.cli.main import app

    return app


def _rows(run_dir: Path) -> list[dict]:
    from locaudit.study.ledger import Ledger

    with Ledger(run_dir) as led:
        return led.rows()


def test_run_json_no_report_prints_the_verdict_and_writes_no_report(run):
    d, res = run
    assert res.exit_code == 0, res.output
    v = json.loads(res.stdout)  # the whole of stdout is one strict JSON document
    assert v["headline"] and "outcome" in v and isinstance(v["table"], list) and v["counts"]["done"] > 0
    assert not (d / "run" / "report").exists()


def test_export_trial_by_name_prefix_lists_every_candidate(run, tmp_path):
    d, _ = run
    rows = _rows(d / "run")
    with_edit = [r for r in rows if (r.get("artifacts") or {}).get("edit")]
    assert len(with_edit) >= 3
    with pytest.raises(ConfigError) as e:
        CliRunner().invoke(_app(), ["export", str(d / "run"), "--trial", "zzzz", "--out", str(tmp_path / "o")],
                           catch_exceptions=False)
    assert f"trials with an edit, {len(with_edit)}: " in str(e.value)
    assert all(r["key"][:10] in str(e.value) for r in with_edit)  # every one, not the first 20
    # a name prefix shared by several trials: every match named
    target = next(r for r in with_edit if r["kind"] == "iti")
    prefix = target["name"][:2]
    n_match = sum(1 for r in rows if str(r.get("name") or "").startswith(prefix) or r["key"].startswith(prefix))
    assert n_match == 2  # "iti top2 ..." and "iti random2@0 ...", both with an edit
    with pytest.raises(ConfigError, match=rf"2 trials match '{prefix}'.*{target['key'][:10]}"):
        CliRunner().invoke(_app(), ["export", str(d / "run"), "--trial", prefix, "--out", str(tmp_path / "o")],
                           catch_exceptions=False)
    # the full name, then --json: one JSON object naming what was written and how the adapter merges
    res = CliRunner().invoke(_app(), ["export", str(d / "run"), "--trial", target["name"], "--out",
                                      str(tmp_path / "x"), "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["merged"] == str(tmp_path / "x" / "merged") and out["peft"] == str(tmp_path / "x" / "peft")
    assert out["model"] == "tiny:llama" and "attention_bias=True" in out["peft_merge"]
    cfg = json.loads((tmp_path / "x" / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny:llama"  # as the study named it, not a cache folder


def test_export_trial_by_a_unique_name_prefix(run, tmp_path):
    d, _ = run
    rows = _rows(d / "run")
    names = [str(r.get("name") or "") for r in rows]
    target = next(r for r in rows if (r.get("artifacts") or {}).get("edit"))
    name = str(target["name"])
    prefix = next((name[:i] for i in range(1, len(name) + 1) if sum(n.startswith(name[:i]) for n in names) == 1), name)
    res = CliRunner().invoke(_app(), ["export", str(d / "run"), "--trial", prefix, "--format", "merged", "--out",
                                      str(tmp_path / "m")], catch_exceptions=False)
    assert res.exit_code == 0 and f"trial {target['key']}" in res.output
