# `make demo` and `make test` work on a fresh clone with only Python 3.10+: they create .venv and install into it,
# at the versions pinned in constraints.txt (so CI and a new user get the same ones).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PIP    := $(BIN)/python -m pip install -q -c constraints.txt
# CPU build of torch (lies on the build machines' disk); the package itself only needs torch>=2.7.
TORCH_PIN ?= torch==2.13.0

.PHONY: install browser demo test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(PIP) "$(TORCH_PIN)"
	$(PIP) -e ".[dev,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/t5hooks demo

# Tests run in TEST_WORKERS pytest-xdist processes (each test is single-threaded: one worker per core), whole
# files per worker so module fixtures are built once. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# The developer loop: everything not marked slow (about 100 s on 2 cores).
test-fast: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) -m "not slow"

# Everything (what CI runs), with the slowest tests listed at the end. The page tests drive a real headless
# Chromium: Debian's chromium + chromium-driver.
test: $(STAMP) browser
	$(BIN)/python -m pytest $(XDIST) --durations=30

# Debian's Chromium and its WebDriver for the page tests (tests/test_viz_*.py); skipped when both are there.
# Needs root or sudo and the Debian archive (as CI has); elsewhere install them once by hand.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver; \
	else echo "make browser: install Chromium and chromedriver at /usr/bin (or set T5HOOKS_CHROMIUM / T5HOOKS_CHROMEDRIVER)"; fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	PYTHONPATH=$(CURDIR) $(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python benchmarks/cpu_model.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
