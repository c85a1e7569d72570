"""`locaudit pack`: a run's results without its activations, resumed in another folder (another machine's
stand-in) with the numbers of a run never interrupted."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch

from eval_fixtures import write_judge_data
from test_optimal_partial import STUDY, Killed, _rows

pytestmark = pytest.mark.usefixtures("one_thread")

# test_optimal_partial's tiny study, with early stopping (a pass checkpoints after every step) at either precision
PACK_STUDY = STUDY.replace("name: tiny-partial", "name: tiny-pack").replace(
    "{{max_parallel: 2}}", "{{max_parallel: 2, eval_every: 1, patience: 5}}")


def _spec(tmp_path: Path, precision: str):
    from locaudit.study.spec import load_study

    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    write_judge_data(data, mc=True)
    path = tmp_path / "study.yaml"
    path.write_text(PACK_STUDY.format(csv=data / "TruthfulQA.csv").replace("precision: fp32", f"precision: {precision}"))
    return load_study(path)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_pack_resumes_elsewhere_with_the_numbers_of_an_uninterrupted_run(tmp_path: Path, monkeypatch,
                                                                            precision: str) -> None:
    from locaudit.edit import multi
    from locaudit.edit import train as train_mod
    from locaudit.study.ledger import PACKED_EVENT
    from locaudit.study.pack import pack_run
    from locaudit.study.runner import run_study

    spec = _spec(tmp_path, precision)
    real, real_stack = train_mod.StackRunner.logps, multi.train_stack
    passes, calls = [0], [0]

    def counted(*a, **k):
        passes[0] += 1
        calls[0] = 0
        return real_stack(*a, **k)

    def dies_in_the_second_pass(self, enc, idx, states):
        if torch.is_grad_enabled():
            calls[0] += 1
            if passes[0] == 2 and calls[0] == 2:  # the first pass is saved; the second has a checkpoint at step 1
                raise Killed("machine gone")
        return real(self, enc, idx, states)

    monkeypatch.setattr(multi, "train_stack", counted)
    monkeypatch.setattr(train_mod.StackRunner, "logps", dies_in_the_second_pass)
    first = run_study(spec, tmp_path / "run", progress=False)
    assert first.failed > 0
    run = tmp_path / "run"
    assert list((run / "shared").glob("collect-*")), "the run's activations exist before packing"
    assert list((run / "shared" / "passes").glob("pass-*/pass.safetensors")), "a pass was interrupted"
    trained_before = {p.parent.name for p in (run / "shared").glob("optimal-*/meta.json")}
    assert trained_before

    summary = pack_run(run, tmp_path / "pack")
    pack = tmp_path / "pack"
    assert not list(pack.glob("shared/collect-*"))  # activations left out
    assert {p.parent.name for p in pack.glob("shared/optimal-*/meta.json")} == trained_before
    assert list(pack.glob("shared/passes/pass-*/pass.safetensors"))  # the checkpoint travels
    assert not (pack / "ledger.sqlite-wal").exists() and not (pack / ".lock").exists()
    assert len(summary.left_out) == 1 and "without their activations" in summary.line()
    with sqlite3.connect(pack / "ledger.sqlite") as c:
        kinds = dict(c.execute("SELECT key, kind FROM trials").fetchall())
        assert kinds[summary.left_out[0]] == "collect"
        status = dict(c.execute("SELECT key, status FROM trials").fetchall())
        assert status[summary.left_out[0]] == "done"  # stays done while no trial still to run reads it
        events = c.execute("SELECT key, event FROM events WHERE key = ?", (summary.left_out[0],)).fetchall()
        assert (summary.left_out[0], PACKED_EVENT) in events
    # no text of the dataset in the pack; the per-question scores and every folder's seal are intact
    from locaudit.io import CHECKSUM_FILE, verify_checksums

    answers = [a for it in json.loads((tmp_path / "data" / "mc_task.json").read_text())
               for a in (*it["mc1_targets"], *it["mc2_targets"])]
    packed = {p.relative_to(pack): p.read_text() for p in pack.rglob("mc_items.jsonl")}
    assert packed and summary.stripped >= len(packed)
    for rel, text in packed.items():
        assert not any(a in text for a in answers) and "What is true about" not in text, rel
        ran = [json.loads(x) for x in (run / rel).read_text().splitlines()]
        got = [json.loads(x) for x in text.splitlines()]
        assert [(r["qid"], r["mc2"], list(r["logprobs"].values())) for r in ran] == \
               [(g["qid"], g["mc2"], g["logprobs_in_order"]) for g in got]
    for manifest in pack.rglob(CHECKSUM_FILE):
        assert verify_checksums(manifest.parent) is None, manifest

    # the pack is carried elsewhere (another path stands in for another machine) and resumed there
    elsewhere = tmp_path / "elsewhere" / "run"
    shutil.copytree(pack, elsewhere)
    monkeypatch.setattr(train_mod.StackRunner, "logps", real)
    again = run_study(spec, elsewhere, progress=False, retry_failed=True)
    assert again.failed == 0
    assert not list(elsewhere.glob("shared/collect-*"))  # the probe was done: nothing read the activations again
    metas = [json.loads(p.read_text()) for p in elsewhere.glob("shared/optimal-*/meta.json")]
    assert len(metas) == 5 and any(m["curve"].get("resumed_at") for m in metas)  # from the checkpoint
    resumed = _rows(elsewhere)
    clean = run_study(spec, tmp_path / "clean", progress=False)
    assert clean.failed == 0
    for key, r in _rows(tmp_path / "clean").items():
        assert resumed[key]["status"] == "done"
        assert resumed[key]["metrics"]["mc2"] == pytest.approx(r["metrics"]["mc2"], abs=1e-6), key


def test_a_left_out_collect_runs_again_when_a_trial_still_to_run_reads_it(tmp_path: Path) -> None:
    """Packed right after the collect, before the probe: the probe reads the activations, so the resumed run
    collects them again first (without booking lost time), then goes on to the end."""
    from locaudit.study.ledger import Ledger
    from locaudit.study.pack import pack_run
    from locaudit.study.runner import run_study

    spec = _spec(tmp_path, "fp32")
    first = run_study(spec, tmp_path / "run", progress=False, max_trials=1)
    with Ledger(tmp_path / "run") as led:
        assert [r["kind"] for r in led.rows() if r["status"] == "done"] == ["collect"]
    summary = pack_run(tmp_path / "run", tmp_path / "pack")
    assert first.failed == 0 and len(summary.left_out) == 1
    again = run_study(spec, tmp_path / "pack", progress=False)
    assert again.failed == 0
    assert list((tmp_path / "pack" / "shared").glob("collect-*"))  # collected again
    with Ledger(tmp_path / "pack") as led:
        assert all(r["status"] == "done" for r in led.rows())
        assert summary.left_out[0] not in led.lost_time()  # recomputed on purpose: no lost time
        assert "invalid" in [r["event"] for r in led.events(summary.left_out[0])]


def test_pack_refuses_what_would_lose_data(tmp_path: Path) -> None:
    from locaudit.errors import ConfigError
    from locaudit.study.ledger import Ledger
    from locaudit.study.pack import pack_run

    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="not a run folder"):
        pack_run(run, tmp_path / "p")
    with Ledger(run, writer=True):
        pass
    with pytest.raises(ConfigError, match="outside the run folder"):
        pack_run(run, run / "pack")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an earlier pack"):
        pack_run(run, other)
    assert (other / "mine.txt").read_text() == "keep me"
    with Ledger(tmp_path / "busy", writer=True):  # an earlier pack that a run is going on from, right now
        pass
    with Ledger(tmp_path / "busy", writer=True), pytest.raises(ConfigError, match="is using it"):
        pack_run(run, tmp_path / "busy")
    assert (tmp_path / "busy" / "ledger.sqlite").is_file()
    pack_run(run, tmp_path / "busy")  # once that run has stopped, it is an earlier pack like any other
    first = pack_run(run, tmp_path / "p")
    assert (tmp_path / "p" / "ledger.sqlite").is_file() and first.left_out == []
    pack_run(run, tmp_path / "p")  # an earlier pack is replaced as a whole
    assert (tmp_path / "p" / "ledger.sqlite").is_file()


def test_pack_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from locaudit.cli.main import app
    from locaudit.study.ledger import Ledger

    run = tmp_path / "run"
    with Ledger(run, writer=True):
        pass
    res = CliRunner().invoke(app, ["pack", str(run), "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    assert "packed" in res.output and str(tmp_path / "p") in res.output
    res = CliRunner().invoke(app, ["pack", "--help"])
    assert "resumes from" in res.output


def test_stripping_reseals_an_intact_folder_and_leaves_a_damaged_one_damaged(tmp_path: Path) -> None:
    from locaudit.io import verify_checksums, write_checksums
    from locaudit.study.pack_text import strip_dataset_text

    def folder(name: str) -> Path:
        d = tmp_path / "trials" / name / "eval"
        d.mkdir(parents=True)
        (d / "generations.jsonl").write_text(json.dumps({"qid": "q1", "question": "Is it?", "answer": "Yes."}) + "\n")
        (d / "mc_items.jsonl").write_text(json.dumps({"qid": "q1", "mc1": 1.0, "mc2": 0.75, "mc0": None,
                                                      "logprobs": {"Yes": -1.0, "No": -2.0}}) + "\n")
        (d / "result.json").write_text("{}")
        write_checksums(d)
        return d

    ok, bad = folder("ok"), folder("bad")
    (bad / "result.json").write_text('{"tampered": 1}')
    assert strip_dataset_text(tmp_path) == 4
    assert verify_checksums(ok) is None and verify_checksums(bad) is not None
    assert json.loads((ok / "generations.jsonl").read_text()) == {"qid": "q1", "answer": "Yes."}
    assert json.loads((ok / "mc_items.jsonl").read_text())["logprobs_in_order"] == [-1.0, -2.0]
    assert strip_dataset_text(tmp_path) == 0  # nothing left to strip
