"""`locaudit export` from an edit folder and from a study trial (a tiny study run here): the exported
merged model and PEFT adapter, reloaded with plain transformers / peft, reproduce the edited logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from locaudit.edit.base import load_edit
from locaudit.models.tiny import tiny_model

STUDY = {
    "name": "tiny-export",
    "model": {"name": "tiny:llama"},
    "data": {"spec": "pairs:pairs.jsonl"},
    "localizers": {"probe": {"top_k": 2}, "random": {"n": 1}, "single": {"n": 0}},
    "iti": {"alphas": [4.0]},
    "optimal": {"taus": [0.1], "epochs": 1, "max_train_pairs": 8, "max_val_pairs": 4, "batch_size": 4},
    "evaluation": {"metrics": ["pref"], "max_questions": 3, "baseline": False},
}


def _pairs(path: Path, n: int = 24) -> None:
    rows = [{"prompt": f"Is {i} + {i} equal to {2 * i}?", "chosen": "Yes, it is.", "rejected": f"No, it is {2 * i + 1}."}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _cli(*args: str) -> str:
    from typer.testing import CliRunner

    from locaudit.cli.main import app

    res = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def _check_exports(edit, out: Path, ids: torch.Tensor) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lm = tiny_model("llama")
    with torch.no_grad(), edit.applied(lm):
        live = lm.model(input_ids=ids).logits
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), attn_implementation="eager")
    base = tiny_model("llama").model
    pm = PeftModel.from_pretrained(base, str(out / "peft"))
    with torch.no_grad():
        assert float((merged(input_ids=ids).logits - live).abs().max()) <= 1e-4
        assert float((pm(input_ids=ids).logits - live).abs().max()) <= 1e-4


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    from locaudit.study.runner import run_study
    from locaudit.study.spec import parse_study

    d = tmp_path_factory.mktemp("study")
    _pairs(d / "pairs.jsonl")
    spec = parse_study(STUDY, d, "tiny-export.yaml")
    run = d / "run"
    run_study(spec, run, progress=False)
    return run


def _trials_with_edits(run: Path) -> dict[str, dict]:
    from locaudit.study.ledger import Ledger

    with Ledger(run) as led:
        rows = [r for r in led.rows() if r["status"] == "done" and (r["artifacts"] or {}).get("edit")]
    return {r["kind"]: r for r in rows}


@pytest.mark.parametrize("kind", ["iti", "optimal"])
def test_export_from_a_study_trial(tmp_path, study_run, kind):
    rows = _trials_with_edits(study_run)
    row = next((r for k, r in rows.items() if k.startswith(kind[:3]) or (kind == "optimal" and k != "iti")), None)
    assert row is not None, f"no done {kind} trial with an edit among {sorted(rows)}"
    out = tmp_path / "x"
    _cli("export", str(study_run), "--trial", row["key"][:12], "--out", str(out))
    edit = load_edit(study_run / row["artifacts"]["edit"])
    assert edit.kind == ("iti" if kind == "iti" else "lora")
    _check_exports(edit, out, torch.randint(3, 250, (2, 11), generator=torch.Generator().manual_seed(0)))


def test_export_run_folder_needs_a_trial_and_lists_them(tmp_path, study_run):
    from typer.testing import CliRunner

    from locaudit.cli.main import app
    from locaudit.errors import ConfigError

    with pytest.raises(ConfigError, match="--trial"):
        CliRunner().invoke(app, ["export", str(study_run), "--out", str(tmp_path / "o")], catch_exceptions=False)
    with pytest.raises(ConfigError, match="trials with an edit"):
        CliRunner().invoke(app, ["export", str(study_run), "--trial", "zzzz", "--out", str(tmp_path / "o")],
                           catch_exceptions=False)


def test_run_folder_without_its_ledger_finds_the_edit_by_its_record(tmp_path, study_run):
    """trial_edit_dir reads trials/KEY/result.json where the ledger is gone; the study's model comes from the
    ledger's spec, and is None without a ledger (the edit's own record names the model then)."""
    import shutil

    from locaudit.cli.export import _study_model, is_run_dir, trial_edit_dir
    from locaudit.study.rundir import LEDGER_FILE

    row = next(iter(_trials_with_edits(study_run).values()))
    assert _study_model(study_run) == "tiny:llama"
    copy = tmp_path / "run"
    shutil.copytree(study_run, copy)
    (copy / LEDGER_FILE).unlink()
    assert is_run_dir(copy) and _study_model(copy) is None
    d, rec = trial_edit_dir(copy, row["key"][:12])
    assert rec["key"] == row["key"] and d == copy / row["artifacts"]["edit"] and d.is_dir()


def test_export_from_an_edit_folder(tmp_path):
    from locaudit.edit.iti import ITIEdit
    from locaudit.heads import HeadSet

    lm = tiny_model("llama")
    L, H, D = lm.sites.shape
    heads = HeadSet.parse("L1H0,L2H3")
    theta = torch.randn(L, H * D, generator=torch.Generator().manual_seed(2)) * heads.dim_mask(L, H, D).float()
    edit = ITIEdit(theta, alpha=3.0, heads=heads, model={"name": "tiny:llama", "fingerprint": lm.fingerprint}, n_heads=H)
    edit.save(tmp_path / "edit")
    _cli("export", str(tmp_path / "edit"), "--out", str(tmp_path / "x"))
    _check_exports(load_edit(tmp_path / "edit"), tmp_path / "x", torch.randint(3, 250, (2, 7)))
    # another model than the edit's: refused unless forced
    from locaudit.errors import ConfigError
    from typer.testing import CliRunner

    from locaudit.cli.main import app

    with pytest.raises(ConfigError, match="fingerprint"):
        CliRunner().invoke(app, ["export", str(tmp_path / "edit"), "--model", "tiny:llama:3", "--out",
                                 str(tmp_path / "y")], catch_exceptions=False)
    _cli("export", str(tmp_path / "edit"), "--model", "tiny:llama:3", "--allow-model-mismatch", "--format", "peft",
         "--out", str(tmp_path / "y"))
    assert (tmp_path / "y" / "adapter_config.json").exists()
