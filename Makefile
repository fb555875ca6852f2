# Two commands: `make demo` (set up, serve on embedded defaults, run the demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; on the development machines it installs from local disk.
TORCH_SPEC ?= torch==2.13.0
PORT ?= 8000

.PHONY: setup browser proxy demo run test clean

$(BIN)/rice: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev,train]"
	touch $(BIN)/rice

setup: $(BIN)/rice

# The console's browser test drives Debian's chromium through chromedriver. Installed once (skipped
# when both are on PATH); apt-get needs root, so sudo is used when there is one and we are not root.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || command -v sudo >/dev/null && [ "$$(id -u)" -ne 0 ] && echo sudo)
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
		echo "chromium and chromedriver present"; \
	else \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium chromium-driver; \
	fi

# The sharded deployment's test routes through Debian's nginx (tests/test_sharded.py runs it on
# loopback with docker/nginx-sharded.conf). Installed once like chromium (skipped when nginx is on
# PATH or at /usr/sbin/nginx, outside a normal user's PATH). Debian may start its own nginx service
# (port 80) at install; the test never uses it.
proxy:
	@if command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; then \
		echo "nginx present"; \
	else \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends nginx; \
	fi

demo: setup
	$(BIN)/rice demo

run: setup
	$(BIN)/rice serve --port $(PORT)

test: setup browser proxy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q


clean:
	rm -rf $(VENV) data demo_out .pytest_cache .mypy_cache .ruff_cache
