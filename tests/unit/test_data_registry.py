"""`locaudit data`: every built-in dataset with licence, source, checksum and where it was found; `data get`
downloads into the cache and checks the checksum, tested against a local HTTP server (never the network)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from locaudit.data import registry
from locaudit.errors import ConfigError, DataError

runner = CliRunner()
REAL = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture
def server():
    """A file server on 127.0.0.1 over a temporary folder (the data layout); yields (folder, base URL)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="locaudit-mirror-"))
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fresh_machine(tmp_path, monkeypatch):
    """No $LOCAUDIT_DATA, no sibling data folder, an empty cache: a clone outside the repository's parent."""
    monkeypatch.delenv("LOCAUDIT_DATA", raising=False)
    monkeypatch.delenv("LOCAUDIT_SHARED_DATA", raising=False)
    monkeypatch.setenv("LOCAUDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(registry, "repo_sibling", lambda: tmp_path / "no-sibling" / "shared" / "data")
    return tmp_path


def _toy(monkeypatch, body: bytes = b"prompt,chosen,rejected\nq,a,b\n") -> registry.Dataset:
    d = registry.Dataset("toy", "toys", "toys/toy.csv", "http://127.0.0.1:9/unused/toy.csv",
                         hashlib.sha256(body).hexdigest(), len(body), "CC0-1.0", "a toy dataset")
    monkeypatch.setitem(registry.DATASETS, "toy", d)
    monkeypatch.setitem(registry.GROUPS, "toys", ["toy"])
    return d


def test_registry_lists_every_builtin_dataset_with_licence_source_checksum():
    names = set(registry.DATASETS)
    assert {"truthfulqa", "truthfulqa-v1", "truthfulqa-v0", "truthfulqa-mc", "truthfulqa-judge-truth",
            "truthfulqa-judge-info", "known_1000", "caa-sycophancy", "caa-test-refusal"} <= names
    assert sum(n.startswith("caa-") for n in names) == 21
    for d in registry.DATASETS.values():
        assert len(d.sha256) == 64 and d.size > 0 and d.licence and d.url.startswith("https://")
    assert "CC-BY-4.0" in registry.DATASETS["caa-sycophancy"].licence
    assert registry.DATASETS["caa-refusal"].licence == "MIT"


@pytest.mark.skipif(not REAL.is_dir(), reason=f"no shared data folder at {REAL} to check checksums against")
def test_checksums_match_the_shared_data_files():
    bad = [d.name for d in registry.DATASETS.values()
           if not (REAL / d.path).is_file() or registry.sha256_of(REAL / d.path) != d.sha256]
    assert bad == []


def test_get_downloads_into_the_cache_and_checks_the_checksum(fresh_machine, server, monkeypatch):
    root, url = server
    d = _toy(monkeypatch)
    assert registry.locate("toy").status == "missing"
    with pytest.raises(DataError, match=r"dataset 'toy'.*not on this machine.*locaudit data get toy"):
        registry.path("toy")
    (root / "toys").mkdir()
    (root / "toys" / "toy.csv").write_bytes(b"prompt,chosen,rejected\nq,a,TAMPERED\n")
    with pytest.raises(DataError, match=r"'toy'.*has sha256 [0-9a-f]{64}, expected " + d.sha256):
        registry.fetch(d, url_base=url)
    assert [p for p in (fresh_machine / "cache").rglob("*") if p.is_file()] == []  # nothing written
    (root / "toys" / "toy.csv").write_bytes(b"prompt,chosen,rejected\nq,a,b\n")
    res = runner.invoke(_app(), ["data", "get", "toys", "--url-base", url])
    assert res.exit_code == 0, res.output
    f = registry.locate("toy")
    assert f.status == "ok" and f.where == "cache" and f.path == fresh_machine / "cache" / "data" / "toys" / "toy.csv"
    listed = [json.loads(line) for line in runner.invoke(_app(), ["data", "--json"]).output.splitlines()]
    toy = next(r for r in listed if r["name"] == "toy")
    assert toy["where"] == "cache" and toy["status"] == "ok" and toy["licence"] == "CC0-1.0"
    # LOCAUDIT_DATA comes first
    monkeypatch.setenv("LOCAUDIT_DATA", str(root))
    assert registry.locate("toy").where == "$LOCAUDIT_DATA"


def test_unreachable_source_is_one_line(fresh_machine, monkeypatch):
    d = _toy(monkeypatch)
    with pytest.raises(DataError, match=r"cannot download http://127.0.0.1:9/unused/toy.csv.*LOCAUDIT_DATA") as e:
        registry.fetch(d, timeout=5)
    assert "\n" not in str(e.value)


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ConfigError, match="did you mean 'truthfulqa-v1'"):
        registry.expand(["truthfulqa-v2"])
    assert [d.name for d in registry.expand(["rome", "known_1000"])] == ["known_1000"]
    assert len(registry.expand(["truthfulqa"])) == 8


@pytest.mark.skipif(not REAL.is_dir(), reason=f"no shared data folder at {REAL} to serve")
def test_fresh_clone_gets_truthfulqa_from_a_mirror_and_a_study_finds_it(fresh_machine, server, monkeypatch):
    """A clone with no sibling data: `locaudit data get truthfulqa` from a local server, then the study
    files' ${LOCAUDIT_DATA:-...} paths resolve to the cache."""
    from locaudit.study.spec import expand_env

    root, url = server
    shutil.copytree(REAL / "truthfulqa", root / "truthfulqa")
    res = runner.invoke(_app(), ["data", "get", "truthfulqa", "--url-base", url])
    assert res.exit_code == 0, res.output
    assert all(registry.locate(d).status == "ok" for d in registry.GROUPS["truthfulqa"])
    spec = expand_env("truthfulqa:${LOCAUDIT_DATA:-../../shared/data}/truthfulqa/data/v1/TruthfulQA.csv", "data.spec")
    assert spec == f"truthfulqa:{fresh_machine / 'cache' / 'data'}/truthfulqa/data/v1/TruthfulQA.csv"
    from locaudit.evaluate.judges.registry import judge_data_dir

    assert judge_data_dir() == fresh_machine / "cache" / "data" / "truthfulqa" / "data"
    res = runner.invoke(_app(), ["data", "path", "truthfulqa-v1"])
    assert res.output.strip() == spec.split(":", 1)[1]


def test_the_old_variable_still_works_with_a_deprecation_warning(fresh_machine, monkeypatch):
    from locaudit.data.caa import caa_root

    (fresh_machine / "old" / "caa").mkdir(parents=True)
    monkeypatch.setenv("LOCAUDIT_SHARED_DATA", str(fresh_machine / "old"))
    with pytest.warns(DeprecationWarning, match="LOCAUDIT_SHARED_DATA is deprecated: set LOCAUDIT_DATA"):
        assert caa_root() == fresh_machine / "old" / "caa"
    monkeypatch.setenv("LOCAUDIT_DATA", str(fresh_machine / "new"))
    assert registry.roots()[0] == ("$LOCAUDIT_DATA", fresh_machine / "new")


def _app():
    from locaudit.cli.main import app

    return app
