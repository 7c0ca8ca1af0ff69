# One command sets everything up and runs the tests: `make test`.
# The only place the torch version is named. 2.13.0 is the CPU build that this
# kind of machine installs from its local disk; an unpinned `torch` would pull a
# multi-GB CUDA build instead.
TORCH_VERSION ?= 2.13.0
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

test: setup
	$(BIN)/python -m pytest -q

# The main job: pretrain -> SFT -> DPO a small model on the built-in corpus (about 4 minutes on 2 cores).
demo: setup
	$(BIN)/minillm-func demo --out runs/demo

clean:
	rm -rf $(VENV) *.egg-info .hypothesis
