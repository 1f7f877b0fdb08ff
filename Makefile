# The two commands of the README: `make demo` (the main job) and `make test`. Both set up what is missing.
# Uses the active virtualenv if there is one, else .venv/ in the checkout.
PY := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV)/bin/python,$(CURDIR)/.venv/bin/python)
PYTEST_ARGS ?=

.PHONY: setup test test-long test-docs demo lint
setup:
	bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the long checks kept out of `make test` (marker `long`: the benchmark scripts' quick runs, the demo, the SIGKILL
# resume tests, the learning test); CI runs both
test-long: setup
	$(PY) -m pytest -q -m long $(PYTEST_ARGS)

# every command block of README.md and examples/*/README.md, run shrunk (tests/docs); CI runs it after test-long
test-docs: setup
	$(PY) -m pytest -q -m docs $(PYTEST_ARGS)

demo: setup
	cd $(CURDIR) && $(dir $(PY))rmt-demo $(DEMO_ARGS)

lint: setup
	$(PY) -m ruff --version >/dev/null 2>&1 || $(PY) -m pip install -q ruff
	$(PY) -m ruff check rmt_fairseq user_dir tests benchmarks
