# Two commands do everything on a fresh machine with python3: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Rebuilt only when the declared dependencies change, so a second `make test` installs nothing.
STAMP  := $(VENV)/.installed
# On these machines this pin resolves to a local CPU wheel; a newer torch pulls GBs of CUDA.
TORCH  ?= torch==2.13.0

.PHONY: setup test demo lint clean

setup: $(STAMP)

# torch first; DeepSpeed's build imports torch, so it gets the venv's torch, not an isolated one.
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet --no-build-isolation "deepspeed>=0.16"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/python launch/demo.py

lint: $(STAMP)
	$(BIN)/ruff check .

# The environment, build outputs and caches only: runs/ (prepared data, checkpoints, exports) is
# the user's work and is never removed here.
clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
	find . -path ./runs -prune -o -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
