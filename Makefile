# tlaunch developer targets. Every target installs what it needs on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch from the machine's wheel cache; an unpinned resolve pulls a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
XLA_VENV := .venv-xla
XLA_PINS ?= torch==2.9.0 torch_xla==2.9.0
PYTEST_FLAGS ?= -q

.PHONY: install demo test test-xla test-gpu test-all lint format bench clean

$(BIN)/tlaunch: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_PIN)
	# The pin again on the same line: lightning and transformers must not move torch.
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_PIN) -e '.[dev,compat]'
	touch $@

install: $(BIN)/tlaunch

demo: install
	$(BIN)/python examples/demo.py

test: install
	$(BIN)/python -m pytest $(PYTEST_FLAGS)

$(XLA_VENV)/.installed: pyproject.toml
	test -x $(XLA_VENV)/bin/python || $(PY) -m venv $(XLA_VENV)
	$(XLA_VENV)/bin/pip install -q --disable-pip-version-check $(XLA_PINS)
	$(XLA_VENV)/bin/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

test-xla: $(XLA_VENV)/.installed
	PJRT_DEVICE=CPU $(XLA_VENV)/bin/python -m pytest $(PYTEST_FLAGS) -m xla -o addopts='-p no:cacheprovider' tests

# CUDA tests (marker gpu): needs a CUDA build of torch in $(VENV); without a GPU all are skipped.
# Not part of test-all: CI has no GPU.
test-gpu: install
	$(BIN)/python -m pytest $(PYTEST_FLAGS) -rs -m gpu -o addopts='-p no:cacheprovider' tests

test-all: test test-xla

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	@for b in benchmarks/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(XLA_VENV) build *.egg-info
