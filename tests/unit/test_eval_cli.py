"""CLI: `locaudit iti` (fit, save, generate) and `locaudit eval` on a tiny model saved to a folder."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from eval_fixtures import save_tiny_model, write_truthfulqa
from locaudit.cli.main import app
from locaudit.data.behaviour import load_behaviour
from locaudit.data.prompts import PromptFormat
from locaudit.edit.base import load_edit
from locaudit.edit.iti import ITIEdit
from locaudit.evaluate.klce import clear_memory_cache
from locaudit.localize.activations import collect_probe_activations
from locaudit.localize.probe import probe_activations
from locaudit.models.tiny import tiny_model
from locaudit.models.precision import resolve_precision as _P  # resolved once, as entry points do

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    import os

    old = os.environ.get("LOCAUDIT_CACHE")
    os.environ["LOCAUDIT_CACHE"] = str(root / "cache")
    csv = write_truthfulqa(root / "tqa")
    spec = f"truthfulqa:{csv}"
    lm = tiny_model("llama")
    model_dir = save_tiny_model(lm, root / "model")
    data = load_behaviour(spec)
    acts = collect_probe_activations(lm, data, PromptFormat("plain"), out_dir=root / "acts", progress=False, precision=_P('fp32'))
    probe_activations(acts).save(root / "probe")
    yield {"root": root, "spec": spec, "model": str(model_dir)}
    clear_memory_cache()
    if old is None:
        os.environ.pop("LOCAUDIT_CACHE", None)
    else:
        os.environ["LOCAUDIT_CACHE"] = old


def invoke(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 0, (res.output, res.exception)
    return res


def test_iti_cli_fits_saves_and_generates(setup):
    r = setup["root"]
    out = r / "iti"
    invoke(["iti", "--activations", str(r / "acts"), "--probe", str(r / "probe"), "--heads", "top3",
            "--alpha", "7", "--out", str(out), "--generate", "--data", setup["spec"], "--model", setup["model"],
            "--split", "test", "--max-new-tokens", "4"])
    edit = load_edit(out)
    assert isinstance(edit, ITIEdit) and edit.alpha == 7.0 and len(edit.heads) == 3
    assert edit.heads.name == "top3" and edit.model["name"] == "tiny-llama"
    gens = [json.loads(x) for x in (out / "generations_test.jsonl").read_text().splitlines()]
    assert len(gens) == len(load_behaviour(setup["spec"]).questions("test"))
    invoke(["iti", "--activations", str(r / "acts"), "--probe", str(r / "probe"), "--heads", "L1H2,L2H0",
            "--direction", "probe", "--out", str(r / "iti_probe")])
    assert load_edit(r / "iti_probe").direction == "probe"


def test_iti_cli_errors(setup):
    r = setup["root"]
    res = runner.invoke(app, ["iti", "--activations", str(r / "acts"), "--heads", "top3", "--out", str(r / "x")])
    assert res.exit_code != 0 and "ranking" in str(res.exception)
    res = runner.invoke(app, ["iti", "--activations", str(r / "acts"), "--heads", "L0H0", "--out", str(r / "x"),
                              "--generate"])
    assert res.exit_code != 0 and "--data" in str(res.exception)


def test_eval_cli_baseline_and_iti_alpha(setup):
    r = setup["root"]
    invoke(["iti", "--activations", str(r / "acts"), "--probe", str(r / "probe"), "--heads", "top2",
            "--alpha", "3", "--out", str(r / "iti2")])
    base = invoke(["eval", "--model", setup["model"], "--data", setup["spec"], "--metrics", "mc,kl,ce,pref",
                   "--out", str(r / "eval0"), "--json"])
    assert json.loads(base.stdout)["kl"] == 0.0  # --json: one strict JSON object on stdout, nothing else
    invoke(["eval", "--model", setup["model"], "--data", setup["spec"], "--iti", str(r / "iti2"),
            "--alpha", "9", "--metrics", "kl,gen", "--max-new-tokens", "3", "--out", str(r / "eval0")])
    rows = (r / "eval0" / "results.csv").read_text().splitlines()
    assert len(rows) == 3
    result = json.loads((r / "eval0" / "result.json").read_text())
    assert result["edit"]["alpha"] == 9.0 and result["kl"] > 0 and result["n_generated"] > 0


def test_eval_cli_errors(setup):
    r = setup["root"]
    res = runner.invoke(app, ["eval", "--data", setup["spec"], "--alpha", "3", "--out", str(r / "e")])
    assert res.exit_code != 0 and "--alpha" in str(res.exception)
    res = runner.invoke(app, ["eval", "--data", setup["spec"], "--metrics", "mc,nope", "--out", str(r / "e")])
    assert res.exit_code != 0 and "nope" in str(res.exception)


def test_help_texts():
    for cmd in ("iti", "eval"):
        res = runner.invoke(app, [cmd, "--help"])
        assert res.exit_code == 0 and "Example" in res.output


def test_eval_cli_with_reference_judge(setup):
    r = setup["root"]
    invoke(["eval", "--model", setup["model"], "--data", setup["spec"], "--metrics", "gen",
            "--max-new-tokens", "3", "--judge", "reference", "--out", str(r / "eval_judge")])
    result = json.loads((r / "eval_judge" / "result.json").read_text())
    assert result["judge"].startswith("reference") and result["true"] is not None
    assert result["info"] is None and result["true_info"] is None  # BLEU scores truth only
    assert (r / "eval_judge" / "judgements.jsonl").exists()
