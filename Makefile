# `make demo` and `make test` do all their own set-up from a fresh clone: a virtual environment, the
# pinned CPU torch (constraints.txt: an unpinned torch would pull several GB of CUDA packages), the package
# (scripts/install.sh).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench-quick clean

install: $(STAMP)

# scripts/install.sh: the same steps the container image (Dockerfile) runs; the native small-batch layers are built
# now (~45 s), not in the first request, and a failed build only means the Python forward
$(STAMP): pyproject.toml constraints.txt scripts/install.sh
	PYTHON=$(PYTHON) bash scripts/install.sh --venv $(VENV) --extras dev,bench --editable --native optional
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/padfree demo

test: $(STAMP)
	$(PY) -m pytest -q

bench-quick: $(STAMP)
	$(VENV)/bin/padfree bench --quick

clean:
	rm -rf $(VENV) build *.egg-info
