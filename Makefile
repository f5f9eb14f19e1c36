# Two entry points for a fresh machine: `make repro` and `make test`.
# Both create .venv/ if absent and install the pinned requirements first, and build the
# offline plots page template (npm ci + plots_page/build.py; README: Plots offline).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PLOTS_TEMPLATE := plots_page/template.html
# Stage commands call `python`: make it the venv's.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: repro test lint setup chromium

setup: $(STAMP) $(PLOTS_TEMPLATE)

$(STAMP): requirements.txt requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-r requirements.txt -c requirements.lock
	touch $(STAMP)

# vega, vega-lite and vega-embed at the versions in package-lock.json, inlined into the HTML
# template that .dvc/config names as plots.html_template.
$(PLOTS_TEMPLATE): package.json package-lock.json plots_page/template.src.html plots_page/build.py
	@command -v npm >/dev/null 2>&1 || { echo "npm not found: install Node.js with npm" \
		"(Debian: apt-get install npm), then run make again" >&2; exit 1; }
	npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	$(PYTHON) plots_page/build.py

# Headless Chromium for tests/test_plots_browser.py, from apt when missing and running as
# root (CI). Without it that test skips, or fails when CI=true.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q --no-install-recommends chromium \
	    || { apt-get update -q && apt-get install -y -q --no-install-recommends chromium; } \
	    || echo "apt-get could not install chromium" >&2; \
	  else \
	    echo "chromium not installed (needs root: apt-get install chromium)" >&2; \
	  fi; }

repro: setup
	$(BIN)/dvc repro

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint chromium
	$(BIN)/python -m pytest
