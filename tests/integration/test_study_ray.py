"""The Ray executor runs a small study on a real local Ray instance (no mock): every trial done, results
written to the one ledger by the driver, and equal to the local executor's."""

from __future__ import annotations

from pathlib import Path

import pytest

from locaudit.study.ledger import Ledger
from locaudit.study.runner import run_study
from locaudit.study.spec import load_study
from locaudit.study.trials import expand

STUDY = """
name: tiny-ray
model: {{name: "tiny:llama"}}
data: {{spec: "truthfulqa:{csv}", max_questions: 12}}
localizers: {{probe: {{top_k: 2}}, random: {{n: 2}}, single: {{n: 1}}}}
iti: {{alphas: [2.0]}}
optimal: {{taus: [0.1], epochs: 1, max_train_pairs: 8, max_val_pairs: 4, localizers: [top, random]}}
evaluation: {{metrics: [mc, kl], max_questions: 3}}
resources: {{cpus: 1}}
"""


@pytest.mark.ray
def test_ray_executor_local_instance(tmp_path: Path, shared_data: Path, monkeypatch) -> None:
    ray = pytest.importorskip("ray")
    csv = shared_data / "truthfulqa" / "data" / "v1" / "TruthfulQA.csv"
    if not csv.exists():
        pytest.skip(f"{csv} is absent")
    (tmp_path / "study.yaml").write_text(STUDY.format(csv=csv))
    spec = load_study(tmp_path / "study.yaml")
    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    n = len(expand(spec))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"LOCAUDIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}})
    try:
        s = run_study(spec, tmp_path / "ray", executor="ray", progress=False)
        assert s.done == n and s.failed == 0, s.line()
        with Ledger(tmp_path / "ray") as led:
            rows = {r["key"]: r for r in led.rows()}
            workers = {r["worker"] for r in rows.values()}
        assert all(r["status"] == "done" and r["attempts"] == 1 for r in rows.values())
        assert all(w and w != "ray" for w in workers)  # each row names the worker process that ran it
        assert len(workers) >= 2  # two CPUs -> two trials in flight at once, on two worker processes
    finally:
        ray.shutdown()

    local = run_study(spec, tmp_path / "local", progress=False)
    assert local.done == n
    with Ledger(tmp_path / "local") as led:
        for r in led.rows():
            got = rows[r["key"]]["metrics"]
            # `auto` is resolved by each process (a 1-thread Ray worker and this process may measure bf16
            # differently on a bf16-capable CPU); each trial records what it ran: equal precisions must give equal
            # numbers, different ones agree to bf16's rounding
            same = (r.get("artifacts") or {}).get("precision") == (rows[r["key"]].get("artifacts") or {}).get("precision")
            for m, v in r["metrics"].items():
                if m != "train_seconds":
                    assert got[m] == pytest.approx(v, rel=1e-4 if same else 3e-2, abs=1e-6 if same else 1e-2), \
                        (r["name"], m)
