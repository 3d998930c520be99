# Two entry points (see README): `make quickstart` and `make test`. Both create and reuse .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
MANISKILL_STAMP := $(VENV)/.installed-maniskill
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
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

# ManiSkill3 (envs/maniskill.py): its extra, and a Vulkan driver SAPIEN accepts. Debian
# bookworm's Mesa 22 lavapipe lacks descriptorBindingPartiallyBound, so SAPIEN finds no device;
# Mesa 25 from bookworm-backports has it (see the README). The motion planner behind its
# demonstrations (mplib 0.1.1) segfaults under numpy 2, which JAX needs: it gets its own small
# environment, .venv-mp, run as a subprocess (envs/maniskill_demos.py).
$(MANISKILL_STAMP): $(TEST_STAMP)
	echo "deb http://deb.debian.org/debian bookworm-backports main" \
		| $(SUDO) tee /etc/apt/sources.list.d/bookworm-backports.list > /dev/null
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports \
		mesa-vulkan-drivers libvulkan1 > /dev/null
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,ray,vlm,maniskill]"
	$(PY) -m venv .venv-mp
	.venv-mp/bin/pip install -q torch==2.13.0 mani-skill==3.0.1 "numpy<2"
	touch $(MANISKILL_STAMP)

.PHONY: setup setup-maniskill quickstart test test-fast lint bench
setup: $(STAMP)
setup-maniskill: $(MANISKILL_STAMP)

quickstart: $(STAMP)
	$(BIN)/steerlab quickstart --out $(OUT)

# The whole suite, slow tests and the ManiSkill3 suite's included (what CI runs).
test: $(MANISKILL_STAMP)
	$(BIN)/pytest -q -m "slow or not slow"

# The default run: fast tests only.
test-fast: $(TEST_STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/steerlab bench env --json runs/bench/env.json
	$(BIN)/steerlab bench sampling --json runs/bench/sampling.json
