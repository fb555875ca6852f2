# Two commands: `make demo` (set up, serve on embedded defaults, run the demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; on the development machines it installs from local disk.
TORCH_SPEC ?= torch==2.13.0
PORT ?= 8000

.PHONY: setup demo run test clean

$(BIN)/rice: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(BIN)/rice

setup: $(BIN)/rice

demo: setup
	$(BIN)/rice demo

run: setup
	$(BIN)/rice serve --port $(PORT)

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q


clean:
	rm -rf $(VENV) data demo_out .pytest_cache .mypy_cache .ruff_cache
