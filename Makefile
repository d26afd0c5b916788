# Two commands on a fresh machine: `make demo` (the light set-up + the demo on the bundled sample
# volumes) and `make test` (adds PyTorch and the test tools, then the test suite). Both use .venv,
# made once and reused; `make test` after `make demo` only adds what the tests need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (what this machine's package index serves for this pin); an unpinned
# torch from PyPI would pull a multi-GB CUDA build. Elsewhere see the README (PyTorch's CPU index).
TORCH ?= torch==2.13.0

.PHONY: setup setup-test demo test test-fast benchmark clean

setup: $(VENV)/.installed-light

setup-test: $(VENV)/.installed-test

# The light set: numpy, SimpleITK, ONNX Runtime, pydicom, nibabel, tqdm (about 400 MB); no PyTorch, VTK or slicer-core.
$(VENV)/.installed-light: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-light
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[torch,test]'
	touch $@

demo: setup
	$(BIN)/lightfusion demo --out lightfusion-demo

test: setup-test
	$(BIN)/python -m pytest -q

# Everything but the slow wheel/fresh-venv test.
test-fast: setup-test
	$(BIN)/python -m pytest -q -m "not slow"

benchmark: setup-test
	$(BIN)/lightfusion benchmark --json benchmark.json

clean:
	rm -rf $(VENV) lightfusion-demo benchmark.json
