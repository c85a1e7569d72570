"""The Hase study on Ray: a tiny study run with executor="ray" on a local Ray instance (2 CPUs, no mock)
ends with the same ledger statuses and metrics as executor="local"; a second Ray run resumes (runs
nothing); a trial failing in its worker is recorded failed; a preloaded model cannot go to Ray workers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hase_fixtures import four_fact_study

from locaudit.errors import ConfigError
from locaudit.study.hase.run import run_hase
from locaudit.study.ledger import Ledger

pytestmark = pytest.mark.ray

STUDY = (
    "name: tiny-hase-ray\nmodel: {name: 'tiny:llama'}\nprecision: fp32\n"
    "facts: {path: facts.jsonl, known_top_k: 259, max_facts: 4, n_neighbours: 1}\n"
    "tracing: {n_noise: 2, kinds: [mlp], grid_facts: 0}\nlayers: [0, 2]\n"
    "editing: {problems: [error_injection], methods: [ft, lora],\n"
    "  ft: {steps: 2, lr: 0.05, norm_bound: 0.1, batch_facts: 4}, lora: {steps: 2, lr: 0.1, batch_facts: 4}}\n"
    "analysis: {bootstrap: 20}\nresources: {cpus: 1, gpus: 0}\n"
)


def _spec(tmp_path: Path):
    return four_fact_study(tmp_path, STUDY)


def _rows(run_dir: Path) -> dict:
    with Ledger(run_dir) as led:
        return {r["key"]: r for r in led.rows()}


def test_hase_ray_matches_local_and_resumes(tmp_path: Path, monkeypatch) -> None:
    ray = pytest.importorskip("ray")
    from locaudit.study.executors import RayExecutor

    most = []  # how many trials the driver had in flight after each submit

    def submit(self, group, _orig=RayExecutor.submit):
        _orig(self, group)
        most.append(self.in_flight())

    monkeypatch.setattr(RayExecutor, "submit", submit)
    spec = _spec(tmp_path)
    with pytest.raises(ConfigError, match="Ray workers"):
        run_hase(spec, tmp_path / "nope", lm=object(), executor="ray", progress=False)

    local = run_hase(spec, tmp_path / "local", progress=False)
    n = 2 + 1 * 2 * 2  # facts, trace, (problem x method x layer) edits
    assert local["counts"].get("done") == n and not local["counts"].get("failed"), local

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"LOCAUDIT_CACHE": os.environ["LOCAUDIT_CACHE"], "OMP_NUM_THREADS": "1",
                                       "MKL_NUM_THREADS": "1"}})
    try:
        res = run_hase(spec, tmp_path / "ray", executor="ray", progress=False)
        assert res["counts"]["done"] == n and not res["counts"].get("failed"), res
        assert len(res["ran"]) == n
        assert max(most) == 2  # 2 CPUs, 1 per trial: the edit trials went out two at a time
        again = run_hase(spec, tmp_path / "ray", executor="ray", progress=False)
        assert again["ran"] == [] and again["counts"] == res["counts"]
        # a trial that fails in its worker is recorded failed with the worker's error; its dependants wait
        bad = spec.model_copy(update={"model": spec.model.model_copy(update={"dtype": "nope"})})
        failed = run_hase(bad, tmp_path / "bad", executor="ray", progress=False)
        c = failed["counts"]
        assert failed["ran"] == ["facts"] and (c["failed"], c["pending"], c["done"]) == (1, n - 1, 0), failed
        with Ledger(tmp_path / "bad") as led:
            row = next(r for r in led.rows() if r["status"] == "failed")
        assert "dtype 'nope'" in row["error"]
    finally:
        ray.shutdown()

    want, got = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    assert set(got) == set(want)
    workers = {r["worker"] for r in got.values()}
    # each row names the Ray worker process that ran it (host:pid), never this driver
    assert all(w and w not in ("local", "ray") and not w.endswith(f":{os.getpid()}") for w in workers), workers
    for key, w in want.items():
        g = got[key]
        assert g["status"] == w["status"] == "done" and g["attempts"] == 1, (w["name"], g["status"], g["error"])
        assert set(g["metrics"]) == set(w["metrics"]), w["name"]
        for m, v in w["metrics"].items():
            assert g["metrics"][m] == pytest.approx(v, abs=1e-6), (w["name"], m)
        assert g["artifacts"] == w["artifacts"]
        # the driver sealed the worker's data/ folder and wrote result.json
        assert (tmp_path / "ray" / "trials" / key / "data" / "checksums.json").is_file()
        assert (tmp_path / "ray" / "trials" / key / "result.json").is_file()
