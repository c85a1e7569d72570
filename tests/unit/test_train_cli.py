"""`locaudit edit` end to end on a tiny model saved as a folder and a JSONL pairs file."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from locaudit.cli.main import app


@pytest.fixture
def tiny_folder(tmp_path):
    from locaudit.models.tiny import tiny_model

    lm = tiny_model("llama")
    lm.model.save_pretrained(str(tmp_path / "model"))
    lm.tokenizer.save_pretrained(str(tmp_path / "model"))
    return tmp_path / "model"


def test_edit_cli_trains_and_saves(tmp_path, tiny_folder, monkeypatch):
    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "pairs.jsonl"
    with data.open("w") as f:
        for i in range(30):
            f.write(json.dumps({"prompt": f"What is item {i}?", "chosen": f"Good {i % 4}.",
                                "rejected": f"Bad bad {i % 3}!"}) + "\n")
    out = tmp_path / "edit"
    res = CliRunner().invoke(app, ["edit", "--model", str(tiny_folder), "--data", f"pairs:{data}", "--heads", "L1H2,L2",
                                   "--epochs", "1", "--lr", "0.01", "--no-progress", "--precision", "fp32",
                                   "--no-checkpointing", "--export-peft", str(tmp_path / "peft"), "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "held-out (val) preference accuracy:" in res.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "lora" and meta["objective"] == "ipo" and meta["config"]["lr"] == 0.01
    assert meta["config"]["gradient_checkpointing"] is False
    assert meta["heads"]["heads"][0] == [1, 2] and len(meta["heads"]["heads"]) == 5
    assert meta["curve"]["epochs"] and meta["data"]["spec"] == f"pairs:{data}"
    assert (out / "edit.safetensors").exists() and (tmp_path / "peft" / "adapter_config.json").exists()


def test_edit_cli_help_shows_example_and_every_option():
    res = CliRunner().invoke(app, ["edit", "--help"], terminal_width=200)
    assert res.exit_code == 0 and "Example:" in res.output and "locaudit edit --data" in res.output
    from locaudit.cli.edit import edit

    import inspect

    for p in inspect.signature(edit).parameters.values():
        assert p.default.help, f"option {p.name} has no help"


def test_edit_cli_top_k_without_probe_is_an_error(tmp_path, tiny_folder):
    res = CliRunner().invoke(app, ["edit", "--model", str(tiny_folder), "--data", "pairs:/nonexistent.jsonl",
                                   "--heads", "top4", "--out", str(tmp_path / "e")])
    assert res.exit_code != 0
    assert "ranking" in str(res.exception)
