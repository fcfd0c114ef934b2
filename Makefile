# The two README commands: `make demo` (main job on the embedded default) and `make test`.
# Both create .venv and install the pinned set (with the `edge` runtimes) first; reruns skip
# the install.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.facekd-installed

.PHONY: install demo test lint bench gpu-check

$(STAMP): pyproject.toml requirements.lock requirements-edge.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock -r requirements-edge.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/facekd demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check facekd tests bench data_prep eval recipes

bench: $(STAMP)  # list them; run one with: make bench B=p1_recordio_read
	$(BIN)/python -m bench $(B)

gpu-check: $(STAMP)  # one CUDA GPU, < 8 min: writes bench/results/gpu_check.{md,json}
	$(BIN)/python -m bench.gpu_check
