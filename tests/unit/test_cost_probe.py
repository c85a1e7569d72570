"""`locaudit run STUDY --dry-run --measure`: the optimal edits' cost estimated from pieces timed on this machine
(study/cost_probe.py), on a tiny study."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from eval_fixtures import write_judge_data

pytestmark = pytest.mark.usefixtures("one_thread")

STUDY = """
name: tiny-measure
model: {{name: "tiny:llama"}}
precision: {precision}
data: {{spec: "truthfulqa:{csv}", seed: 1}}
localizers:
  probe: {{top_k: 2}}
  random: {{n: 3}}
  single: {{n: 2, top: 0}}
  all: true
iti: {{enabled: false}}
optimal:
  taus: [0.1]
  epochs: 1
  max_train_pairs: 12
  max_val_pairs: 4
  batch_size: 2
  dose_steps: [0.5]
  dose_localizers: [top, random, all]
  train_options: {{eval_every: 2, patience: 2, max_epochs: 3, warmup_ratio: 0.3}}
evaluation: {{metrics: [mc, kl], max_questions: 6}}
verdict: {{primary_metric: mc2}}
"""


def _spec(tmp_path: Path, precision: str = "fp32") -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    write_judge_data(data, mc=True)
    path = tmp_path / f"study-{precision}.yaml"
    path.write_text(STUDY.format(csv=data / "TruthfulQA.csv", precision=precision))
    return path


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_estimate_is_the_measured_pieces_multiplied_out(tmp_path: Path, precision: str) -> None:
    from locaudit.study.cost_probe import measure_study
    from locaudit.study.spec import load_study

    spec = load_study(_spec(tmp_path, precision))
    r = measure_study(spec, steps=2)
    m, o = r["measured"], r["optimal"]
    tr = m["train"]
    assert tr["steps"] == 2 and tr["n_val"] == 4
    assert m["edits_together"] == 4  # evaluated together, as the group is: the 3 random draws, a single head
    w = m["machine"]  # where it was measured, kept beside the numbers
    assert w["precision"] == precision and w["device"] == "cpu" and w["threads"] == 1
    assert w["cpu_capability"] and w["torch"] and w["measured_at"].endswith("Z")
    assert all(tr[k] > 0 for k in ("step_wall_s", "step_cpu_s", "val_wall_s", "val_cpu_s"))
    # 1 top + 3 random + 2 single + 1 all = 7 trials; 12 pairs / batch 2 = 6 steps an epoch, 3 epochs at most,
    # 18 steps, the first ceil(0.3 x 18) = 6 of them warm-up: the earliest stop is 2 checks (every 2 steps)
    # counted from step 6, at step 8 (at step 4 if warm-up checks counted)
    assert o["trials"] == 7 and o["steps_low"] == 8 and o["steps_high"] == 18
    step = tr["step_wall_s"] + tr["val_wall_s"] / 2
    assert o["step_wall_s"] == pytest.approx(step)
    ev = m["mc"]["wall_s"] / m["mc"]["questions"] * m["n_split"] + m["kl"]["wall_s"]
    assert o["eval_wall_s"] == pytest.approx(ev) and "gen" not in m
    # the training share of each trial scales with the layers it runs: between 1/L (an edit at the top layer
    # only) and 1 (from layer 0) of the all-heads step
    L = 2
    fixed = 7 * ev + 5 * ev  # every trial's evaluation; one dose point each for top, 3 random and all
    assert 7 * 18 * step / L - 1e-9 <= o["high_wall_s"] - fixed <= 7 * 18 * step + 1e-9
    assert o["low_wall_s"] - fixed == pytest.approx((o["high_wall_s"] - fixed) * 8 / 18)
    assert math.isfinite(o["high_cpu_s"]) and o["low_cpu_s"] <= o["high_cpu_s"]
    assert not list(tmp_path.glob("**/ledger.sqlite"))  # nothing of a run is written


def test_cli_dry_run_measure_prints_the_range(tmp_path: Path) -> None:
    from locaudit.cli.main import app

    path = _spec(tmp_path)
    res = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run"), "--dry-run", "--measure"])
    assert res.exit_code == 0, res.output
    assert "measured on this machine (cpu, " in res.output and "fp32, 1 thread(s), " in res.output
    assert "): an optimizer step at all heads" in res.output
    assert "cost optimal (measured, 7 trials, each trained 8 to 18 steps" in res.output
    assert not (tmp_path / "run").exists()
    bad = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run"), "--measure"])
    assert bad.exit_code != 0 and "--dry-run" in bad.output


def test_dry_run_json_keeps_the_line_that_runs_it_with_its_overrides(tmp_path: Path) -> None:
    import json

    from locaudit.cli.main import app

    path = _spec(tmp_path)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", str(path), "--out", str(out), "--dry-run", "--json", "--precision", "bf16"])
    assert res.exit_code == 0, res.output
    cmd = json.loads(res.stdout)["command"]
    assert cmd == f"locaudit run {path.as_posix()} --out {out.as_posix()} --precision bf16"
    assert not out.exists()


def test_dry_run_json_line_carries_the_model_override_quoted_for_a_shell(tmp_path: Path) -> None:
    """--model runs the design on another model: the kept line names it, and a path with a space stays one word."""
    import json
    import shlex

    from locaudit.cli.main import app

    folder = tmp_path / "my studies"
    folder.mkdir()
    path = _spec(folder)
    out = tmp_path / "run two"
    res = CliRunner().invoke(app, ["run", str(path), "--out", str(out), "--dry-run", "--json", "--model", "tiny:gpt2"])
    assert res.exit_code == 0, res.output
    cmd = json.loads(res.stdout)["command"]
    assert shlex.split(cmd) == ["locaudit", "run", path.as_posix(), "--out", out.as_posix(), "--model", "tiny:gpt2"]
    assert not out.exists()
