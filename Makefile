# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv in
# the repo root if missing and install everything from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned to the CPU wheel: a bare `torch` requirement would pull the newest
# CUDA build (several GB). The project then installs against it.
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q $(TORCH)
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tokenscale demo

# The report page's test opens it in a real browser: Debian's chromium, installed here where
# it is missing (CI runs as root on Debian; elsewhere install chromium yourself).
CHROMIUM := $(shell command -v chromium || command -v chromium-browser)

browser:
ifeq ($(CHROMIUM),)
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
endif

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) tokenscale-store .pytest_cache
