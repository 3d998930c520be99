# Two entry points (see README): `make quickstart` and `make test`. Both create and reuse .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
OUT ?= runs/quickstart

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,ray]"
	touch $(STAMP)

# The tests also cover the optional VLM judge, so they install its extra (torch, CPU build);
# the quickstart's environment stays torch-free.
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,ray,vlm]"
	touch $(TEST_STAMP)

.PHONY: setup quickstart test test-fast lint bench
setup: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/steerlab quickstart --out $(OUT)

# The whole suite, slow tests included (what CI runs).
test: $(TEST_STAMP)
	$(BIN)/pytest -q -m "slow or not slow"

# The default run: fast tests only.
test-fast: $(TEST_STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/steerlab bench env --json runs/bench/env.json
	$(BIN)/steerlab bench sampling --json runs/bench/sampling.json
