"""Fixtures shared by the integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def tiny_study(tmp_path: Path, shared_data: Path, monkeypatch):
    """load_tiny_study(text): a study YAML (with a {csv} placeholder for TruthfulQA v1) written to tmp_path and
    loaded, with LOCAUDIT_CACHE in tmp_path; skips, with the reason, where the CSV is absent."""
    from locaudit.study.spec import load_study

    csv = shared_data / "truthfulqa" / "data" / "v1" / "TruthfulQA.csv"
    if not csv.exists():
        pytest.skip(f"{csv} is absent")
    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))

    def load_tiny_study(text: str):
        path = tmp_path / "study.yaml"
        path.write_text(text.format(csv=csv))
        return load_study(path)
    return load_tiny_study
