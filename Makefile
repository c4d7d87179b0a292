# The README's first two commands: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . 2>/dev/null \
		|| $(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# Exit 1 means "some VMs failed": the built-in estate has VMs whose KMS is unreachable on purpose.
demo: $(STAMP)
	@$(BIN)/avma-remediator sweep --simulate --apply --yes; code=$$?; \
	if [ $$code -eq 1 ]; then echo "(exit code 1: some VMs failed, as the demo estate intends; see 'What to do')"; \
	elif [ $$code -ne 0 ]; then exit $$code; fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Azurite (the storage emulator the tests start) comes from npm, pinned in package-lock.json.
node_modules/.package-lock.json: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error

# checkov (the infra tests run it) pins pycep-parser 0.5.1 and packaging 23.2, which clash with .venv,
# so it gets a venv of its own. About a minute, once per clone.
CHECKOV_VENV := .venv-checkov
CHECKOV_VERSION := 3.3.30
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)

$(CHECKOV_STAMP):
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet --disable-pip-version-check checkov==$(CHECKOV_VERSION)
	touch $(CHECKOV_STAMP)

# pytest on both cores (pytest-xdist), whole test files per worker (--dist loadfile), so that a
# module's fixtures run once (the chaos run of tests/test_chaos.py); each worker starts its own Azurite
# on free ports. `make unit PYTEST_WORKERS=1` runs it in one process. PYTHONDONTWRITEBYTECODE is
# cleared for this run: without bytecode every worker rewrites and compiles every test module again
# (collection about 11 s of CPU instead of 5), and every CLI subprocess compiles shared/ again.
PYTEST_WORKERS ?= 2

unit: $(STAMP) node_modules/.package-lock.json $(CHECKOV_STAMP)
	PYTHONDONTWRITEBYTECODE= $(BIN)/pytest -q $(if $(filter 1,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python bench/sweep.py --vms 2000 --avma-fraction 0.05 --latency 1 --concurrency 64

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) .mypy_cache .ruff_cache .pytest_cache
