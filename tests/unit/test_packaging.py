"""A library that installs beside other tools: version ranges in pyproject, exact pins in constraints.txt
for make and CI, Ray opt-in, an SPDX licence, `locaudit --version` and `python -m locaudit`."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_dependencies_are_ranges_and_constraints_pin_them():
    proj = _pyproject()["project"]
    deps = proj["dependencies"]
    assert not [d for d in deps if "==" in d], "library dependencies must be ranges, not pins"
    torch = next(d for d in deps if _name(d) == "torch")
    assert ">=" in torch and "<3" in torch
    pins = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", line), f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[_name(line)] = line.split("==", 1)[1]
    extras = proj["optional-dependencies"]
    wanted = {_name(d) for d in deps + extras["test"] + extras["eval"] + extras["ray"]}
    assert wanted - set(pins) == set(), f"constraints.txt lacks {sorted(wanted - set(pins))}"
    assert "locaudit" not in pins


def test_ray_is_opt_in_and_make_test_installs_it():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert not any(_name(d) == "ray" for k, v in extras.items() if k != "ray" for d in v)
    make = (REPO / "Makefile").read_text(encoding="utf-8")
    setup = make.split("$(STAMP): ", 1)[1].split("\n\n", 1)[0]
    assert "ray" not in setup and "-c constraints.txt" in make.replace("$(CONSTRAINTS)", "-c constraints.txt")
    assert re.search(r"^test: setup \$\(RAY_STAMP\)", make, re.M)
    assert "'.[ray]'" in make.split("$(RAY_STAMP): ", 1)[1].split("\n\n", 1)[0]


def test_spdx_licence_string_and_licence_file():
    proj = _pyproject()["project"]
    assert proj["license"] == "Apache-2.0"
    assert (REPO / "LICENSE").read_text(encoding="utf-8").lstrip().startswith("Apache License")
    assert _pyproject()["build-system"]["requires"][0].startswith("setuptools>=77")


def test_version_flag_and_python_dash_m():
    import locaudit
    from locaudit.cli.main import app

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.startswith(f"locaudit {locaudit.__version__} ")
    out = subprocess.run([sys.executable, "-m", "locaudit", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith(f"locaudit {locaudit.__version__}"), out.stderr
    out = subprocess.run([sys.executable, "-m", "locaudit", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "collect" in out.stdout and "export" in out.stdout


def test_installed_metadata_matches_the_package():
    import importlib.metadata as md

    import locaudit

    assert md.version("locaudit") == locaudit.__version__
    assert md.metadata("locaudit")["License-Expression"] == "Apache-2.0"
