# Two commands on a fresh machine: `make demo` (set-up + demo on the bundled sample volumes)
# and `make test` (set-up + the test suite). Set-up makes .venv once and reuses it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test benchmark clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/lightfusion demo --out lightfusion-demo

test: setup
	$(BIN)/python -m pytest -q

benchmark: setup
	$(BIN)/lightfusion benchmark --json benchmark.json

clean:
	rm -rf $(VENV) lightfusion-demo benchmark.json
