# One command sets everything up and runs the tests: `make test`.
# The only place the torch version is named. 2.13.0 is the CPU build that this
# kind of machine installs from its local disk; an unpinned `torch` would pull a
# multi-GB CUDA build instead.
TORCH_VERSION ?= 2.13.0
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test test-fast demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

test: setup
	$(BIN)/python -m pytest -q

# The same without the end-to-end runs marked slow (kill -9 / resume loops): for quick iterations.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The plot extra (matplotlib) is for the demo only: `make test` never needs it.
$(VENV)/.plot-installed: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[plot]'
	touch $@

# The main job: pretrain -> SFT -> DPO, and GRPO, a small model on the built-in corpus (about 5 minutes on 2 cores);
# writes runs/demo/loss_curves.png too.
demo: $(VENV)/.plot-installed
	$(BIN)/minillm-func demo --out runs/demo

clean:
	rm -rf $(VENV) *.egg-info .hypothesis
