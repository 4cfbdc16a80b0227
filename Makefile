# Two commands a newcomer needs: `make test` and `make bench`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kdkernels-installed
# On a machine without a GPU this pins the CPU build of torch that the project's
# machine image carries on disk; override TORCH_SPEC elsewhere (see ENVS.md).
TORCH_SPEC ?= torch==2.13.0
BENCH_ARGS ?=
PYTEST_ARGS ?=
# The GPU machine's Triton, installed beside the venv's own (not imported by it): the
# tests compile every Triton kernel with both (tests/test_triton_compile.py).
TRITON_COMPAT ?= 3.6.0

.PHONY: setup test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[test,bench]"
	$(BIN)/pip install -q --no-deps --target $(VENV)/triton-$(TRITON_COMPAT) triton==$(TRITON_COMPAT) \
		|| echo "warning: triton $(TRITON_COMPAT) not installed; its compile check will skip"
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check kdkernels tests bench examples

test: setup lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m kdkernels bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
