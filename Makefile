# `make demo` and `make test` do all their own set-up from a fresh clone: a virtual environment, the
# pinned CPU torch (constraints.txt: an unpinned torch would pull several GB of CUDA packages), the package.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,bench]"
	-$(PY) -m padfree.ops.native  # build the native small-batch layers now (~45 s), not in the first request
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/padfree demo

test: $(STAMP)
	$(PY) -m pytest -q

bench-quick: $(STAMP)
	$(VENV)/bin/padfree bench --quick

clean:
	rm -rf $(VENV) build *.egg-info
