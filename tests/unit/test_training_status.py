"""How each optimal edit's training ended, in the report: a plateau of its validation loss (early stopping) or the
step cap, where it may still have been improving. Groups that differ in that may differ in gain for a reason that
is not the location, so the report says it per group."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from locaudit.study.figures_training import status_line, training_status


def _curve(losses: list[float], every: int, stopped: int | None, steps_run: int) -> dict:
    evals = [{"step": i * every, "val_loss": v} for i, v in enumerate(losses)]
    b = min(range(len(losses)), key=lambda i: (losses[i], i))
    return {"evals": evals, "best": {"step": b * every, "val_loss": losses[b]}, "stopped_step": stopped,
            "steps_run": steps_run, "before": {"val_loss": losses[0]}}


PLATEAU = _curve([25.0, 20.0, 18.0, 18.5, 18.4, 18.6], 16, 80, 128)  # best at 32, patience 3 ran out at 80
CAP_IMPROVING = _curve([25.0, 22.0, 20.0, 19.0, 18.0], 32, None, 128)  # best at the last check, 128
CAP_FLAT = _curve([25.0, 22.0, 20.0, 20.5, 20.2], 32, None, 128)  # at the cap, best at 64: not still improving


def test_status_tells_a_plateau_from_the_step_cap() -> None:
    per_edit, per_group = training_status([("top4", "top", PLATEAU), ("r@0", "random", CAP_IMPROVING),
                                           ("r@1", "random", CAP_FLAT), ("r@2", "random", PLATEAU)])
    e = per_edit.set_index("localizer")
    assert e.loc["top4", "plateaued"] and e.loc["top4", "steps"] == 80 and e.loc["top4", "best_step"] == 32
    assert not e.loc["top4", "best_at_last_check"]
    assert not e.loc["r@0", "plateaued"] and e.loc["r@0", "steps"] == 128 and e.loc["r@0", "best_at_last_check"]
    assert not e.loc["r@1", "plateaued"] and not e.loc["r@1", "best_at_last_check"]
    assert e.loc["r@0", "val_loss_before"] == 25.0 and e.loc["r@0", "val_loss_kept"] == 18.0
    g = per_group.set_index("group")
    assert g.loc["top"].to_dict() == {"edits": 1, "plateaued": 1, "at_cap_improving": 0, "kept_unedited": 0,
                                      "best_step_median": 32.0,
                                      "best_step_min": 32, "best_step_max": 32, "val_loss_kept_median": 18.0}
    assert (g.loc["random", "edits"], g.loc["random", "plateaued"], g.loc["random", "at_cap_improving"]) == (3, 1, 1)
    line = status_line(per_group)
    assert "probe top-K: 1 of 1 plateaued (best steps 32-32)" in line
    assert "random heads: 1 of 3 plateaued, 1 still improving at the step cap (best steps 32-128)" in line


def test_status_counts_the_edits_that_kept_the_unedited_state() -> None:
    """A single head whose validation loss only rose from its start keeps the identity edit (best step 0): the
    report says so beside 'plateaued', which alone would read as an edit trained to its optimum."""
    NOTHING = _curve([25.0, 25.001, 25.01, 25.02, 25.03], 16, 144, 144)
    per_edit, per_group = training_status([("s@0", "single", NOTHING), ("s@1", "single", PLATEAU),
                                           ("top4", "top", PLATEAU)])
    assert per_edit.set_index("localizer")["kept_unedited"].to_dict() == {"s@0": True, "s@1": False, "top4": False}
    g = per_group.set_index("group")
    assert (g.loc["single", "kept_unedited"], g.loc["top", "kept_unedited"]) == (1, 0)
    line = status_line(per_group)
    assert "single heads: 2 of 2 plateaued, 1 kept the unedited state (no check beat it on validation)" in line
    assert "probe top-K: 1 of 1 plateaued (best steps 32-32)" in line


def test_status_without_early_stopping_is_empty() -> None:
    per_edit, per_group = training_status([("x", "top", {"epochs": [], "steps": []})])
    assert per_edit.empty and per_group.empty and status_line(per_group) is None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_status_reads_the_curves_training_records(precision: str) -> None:
    """On edits trained for real (tiny model): an edit early stopping stopped is 'plateaued' at the step it stopped,
    one that ran every step is not, and the best step is the one training kept."""
    from locaudit.edit.multi import train_edits
    from locaudit.heads import HeadSet
    from locaudit.models.tiny import tiny_model
    from train_fixtures import toy_pairs as pairs

    lm = tiny_model("llama", n_layers=2)
    cfg = dict(progress=False, reference_disk_cache=False, epochs=3, batch_size=2, warmup_ratio=0.0,
               precision=precision, eval_every=1, max_parallel=2)
    out = train_edits(lm, [HeadSet.parse("L0H1"), HeadSet.parse("L1H0")], pairs(6), pairs(3, 40),
                      config=dict(cfg, patience=1), lrs=[5.0, 1e-6])
    curves = [(e.heads.name, "random", e.meta["curve"]) for e, _ in out]
    per_edit, _ = training_status(curves)
    for (e, log), row in zip(out, per_edit.itertuples()):
        stopped = e.meta["curve"].get("stopped_step")  # left out of the record where patience never ran out
        assert row.plateaued == (stopped is not None) and row.best_step == log.best["step"]
        assert row.steps == (stopped if stopped is not None else e.meta["curve"]["steps_run"])
    # the large step size still improves at every check up to the last step; the tiny one never improves
    assert per_edit["plateaued"].tolist() == [False, True]
    assert per_edit["best_at_last_check"].tolist() == [True, False]


def test_report_shows_how_training_ended(tmp_path: Path) -> None:
    """End to end: a study whose top-K edit plateaued and whose random edits ran to the cap still improving."""
    from locaudit.study.report import build_report
    from locaudit.study.runner import run_study
    from locaudit.study.spec import parse_study
    from test_dose import _dose_run

    def run(trials, spec, run_dir):
        for key, result in _dose_run(trials, spec, run_dir):
            t = next(t for t in trials if t.key == key)
            if t.kind == "optimal":
                d = Path(run_dir) / "trials" / key / "edit"
                d.mkdir(parents=True, exist_ok=True)
                curve = PLATEAU if t.group == "top" else CAP_IMPROVING
                (d / "meta.json").write_text(json.dumps({"curve": curve}))
                result["artifacts"]["edit"] = f"trials/{key}/edit"
            yield key, result

    (tmp_path / "pairs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    spec = parse_study({"name": "ts", "model": {"name": "tiny:llama"}, "data": {"spec": "pairs:pairs.jsonl"},
                        "localizers": {"probe": {"top_k": 4}, "random": {"n": 5}},
                        "iti": {"enabled": False}, "optimal": {"dose_steps": [1, 2], "localizers": ["top", "random", "all"]},
                        "evaluation": {"metrics": ["mc", "kl"]}, "verdict": {"primary_metric": "mc2"}},
                       tmp_path, "ts.yaml")
    run_study(spec, tmp_path / "run", fn=run, progress=False)
    rep = build_report(tmp_path / "run", n_resamples=99)
    groups = {g["group"]: g for g in rep.verdict["training"]["groups"]}
    assert (groups["top"]["plateaued"], groups["top"]["at_cap_improving"]) == (1, 0)
    assert (groups["random"]["edits"], groups["random"]["plateaued"], groups["random"]["at_cap_improving"]) == (5, 0, 5)
    assert "random heads: 0 of 5 plateaued, 5 still improving at the step cap" in rep.verdict["training"]["line"]
    assert (rep.out_dir / "training.csv").is_file() and (rep.out_dir / "learning_curves.png").is_file()
    assert "How the optimal edits&#x27; training ended" in rep.index.read_text() or \
        "How the optimal edits' training ended" in rep.index.read_text()
