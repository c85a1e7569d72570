"""Crash tests (issue 27): `export` and `judge train` SIGKILLed at several points of replacing a previous
output. Afterwards the previous output is intact or the new one is complete (never a mix), what the killed
process left is cleaned by the next run, and that run succeeds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# where the killed process dies: after writing into its temporary folder, after checking it (before the swap),
# after the swap (the old output not yet removed), and between the two renames of a swap without renameat2
POINTS = ("writing", "verified", "swapped", "between")

_KILL = r"""
import os, signal, sys
import locaudit.io as lio

def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)

point = sys.argv[1]
if point == "verified":
    lio.follow_umask = die
elif point == "swapped":
    real_exchange = lio._exchange
    def exchange(a, b):
        assert real_exchange(a, b), "renameat2 is unavailable"
        die()
    lio._exchange = exchange
elif point == "between":
    lio._exchange = lambda a, b: False
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        if lio.OLD_TAG in str(dst):
            die()
    os.replace = replace
"""

_EXPORT = _KILL + r"""
import torch
import locaudit.edit.export as ex
from locaudit.models.tiny import tiny_model
from locaudit.edit.iti import ITIEdit
from locaudit.heads import HeadSet

if point == "writing":
    ex.write_json_atomic = die  # the model and tokenizer are written; locaudit_edit.json is next
lm = tiny_model("llama")
L, H, D = lm.sites.shape
theta = torch.zeros(L, H * D)
theta[1, :D] = 1.0
edit = ITIEdit(theta, alpha=float(sys.argv[3]), heads=HeadSet.parse("L1H0"), n_heads=H,
               model={"name": "tiny:llama", "fingerprint": lm.fingerprint})
ex.export_merged(edit, lm, sys.argv[2], overwrite=True)
"""


def _edit(alpha: float):
    import torch

    from locaudit.edit.iti import ITIEdit
    from locaudit.heads import HeadSet
    from locaudit.models.tiny import tiny_model

    lm = tiny_model("llama")
    L, H, D = lm.sites.shape
    theta = torch.zeros(L, H * D)
    theta[1, :D] = 1.0
    return lm, ITIEdit(theta, alpha=alpha, heads=HeadSet.parse("L1H0"), n_heads=H,
                       model={"name": "tiny:llama", "fingerprint": lm.fingerprint})


def _spawn(script: str, *args, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _export_state(out: Path) -> float | None:
    """The alpha of a complete export at `out` (None if `out` is absent); fails on an incomplete one."""
    from locaudit.edit.export import EXPORT_META, _verify_export

    if not out.exists():
        return None
    _verify_export(("config.json", "model.safetensors", EXPORT_META))(out)
    return json.loads((out / EXPORT_META).read_text())["edit"]["alpha"]


def test_export_killed_at_any_point_keeps_the_previous_or_the_new_export(tmp_path):
    from locaudit.edit.export import export_merged
    from locaudit.io import clean_stale_temps

    lm, old = _edit(1.0)
    procs = {}
    for point in POINTS:
        out = tmp_path / point / "out"
        export_merged(old, lm, out)
        procs[point] = _spawn(_EXPORT, point, out, 3.0)
    for point, proc in procs.items():
        log = proc.communicate(timeout=300)[0]
        assert proc.returncode == -signal.SIGKILL, (point, log[-2000:])
        out = tmp_path / point / "out"
        state = _export_state(out)
        if point == "between":  # the old export sits aside under a recognised name until the next run
            assert state is None
            clean_stale_temps(out)
            state = _export_state(out)
        expected = 3.0 if point == "swapped" else 1.0
        assert state == expected, (point, state)
        # the next run cleans what the killed one left and replaces the export
        export_merged(_edit(3.0)[1], lm, out, overwrite=True)
        assert _export_state(out) == 3.0
        assert sorted(p.name for p in out.parent.iterdir()) == ["out"], point


_JUDGE = _KILL + r"""
import json
from pathlib import Path
import locaudit.evaluate.judges.train as tr
from locaudit.evaluate.judges.train import JudgeTrainConfig, train_judge
from locaudit.models.tiny import tiny_model

if point == "writing":
    tr.reliability_diagram = die  # judge.safetensors and judge.json are written; the rest is next
d = Path(sys.argv[3])
cfg = JudgeTrainConfig(kinds=["truth"], model="tiny", truth_data=d / "truth.jsonl",
                       holdout=f"truthfulqa:{d / 'TruthfulQA.csv'}", seed=int(sys.argv[4]), layers=[0, 2],
                       batch_size=8, l2_grid=[1e-2], heads=["logistic"], precision="fp32", audit=False)
train_judge(cfg, sys.argv[2], lm=tiny_model("llama", seed=0))
"""

CSV_HEADER = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
TOPICS = ["cats", "rain", "gold", "moon", "salt", "bees", "iron", "snow", "tea", "owls"]


def _judge_data(d: Path) -> None:
    rows, truth = [], []
    for t in TOPICS:
        q = f"What is true about {t}?"
        good, bad = f"{t.capitalize()} are studied by scientists", f"{t.capitalize()} cause bad luck forever"
        rows.append(f"Adversarial,Misc,{q},{good},{good},{bad},src\n")
        truth += [{"prompt": f"Q: {q}\nA: {good}\nTrue:", "completion": " yes"},
                  {"prompt": f"Q: {q}\nA: {bad}\nTrue:", "completion": " no"}]
    (d / "TruthfulQA.csv").write_text(CSV_HEADER + "".join(rows))
    (d / "truth.jsonl").write_text("".join(json.dumps(r) + "\n" for r in truth))


@pytest.fixture(scope="module")
def judge_seed(tmp_path_factory):
    """(data folder, a trained judge folder with seed 1): the previous output the killed trainings replace."""
    d = tmp_path_factory.mktemp("judge-data")
    _judge_data(d)
    first = _spawn(_JUDGE, "none", d / "seed" / "judge", d, 1, env={"LOCAUDIT_CACHE": str(d / "cache")})
    log = first.communicate(timeout=300)[0]
    assert first.returncode == 0, log[-3000:]
    return d, d / "seed" / "judge"


def test_judge_train_killed_at_any_point_keeps_the_previous_or_the_new_judge(tmp_path, judge_seed):
    import shutil

    from locaudit.evaluate.judges.trained import read_trained_judge
    from locaudit.io import clean_stale_temps

    data, seed = judge_seed
    procs = {}
    for point in ("writing", "verified", "swapped"):
        out = tmp_path / point / "judge"
        shutil.copytree(seed, out)
        procs[point] = _spawn(_JUDGE, point, out, data, 2, env={"LOCAUDIT_CACHE": str(tmp_path / "cache")})
    for point, proc in procs.items():
        log = proc.communicate(timeout=300)[0]
        assert proc.returncode == -signal.SIGKILL, (point, log[-2000:])
        out = tmp_path / point / "judge"
        meta, _, _ = read_trained_judge(out)  # complete: weights match judge.json's weights_sha256
        assert meta["config"]["seed"] == (2 if point == "swapped" else 1), point
        assert (out / "report.json").is_file()
        clean_stale_temps(out)
        assert sorted(p.name for p in out.parent.iterdir()) == ["judge"], point


def test_judge_folder_with_new_weights_beside_an_old_judge_json_is_refused(tmp_path, judge_seed):
    """What a killed in-place retraining used to leave: judge.json of the old judge, weights of a new one."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from locaudit.errors import DataError
    from locaudit.evaluate.judges.trained import read_trained_judge

    shutil.copytree(judge_seed[1], tmp_path / "judge")
    read_trained_judge(tmp_path / "judge")
    w = tmp_path / "judge" / "judge.safetensors"
    t = load_file(str(w))
    t["center"] = t["center"] + torch.ones_like(t["center"])
    save_file(t, str(w))
    with pytest.raises(DataError, match=r"judge\.safetensors: sha256 .* differs from weights_sha256"):
        read_trained_judge(tmp_path / "judge")
