# The two commands of the README: `make demo` (the main job) and `make test`. Both set up what is missing.
# Uses the active virtualenv if there is one, else .venv/ in the checkout.
PY := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV)/bin/python,$(CURDIR)/.venv/bin/python)
PYTEST_ARGS ?=
# pytest-xdist workers (tests/conftest.py gives each its own fork server; 1 torch thread per process under xdist);
# 0 runs the tests in this process, one after another
PYTEST_WORKERS ?= 2
# make test keeps a module's tests on one worker (--dist loadscope: its trained fixtures are built once); the long and
# docs groups are a few independent long tests each, handed out one at a time (--dist load)
PYTEST := $(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=25

.PHONY: setup test test-long test-docs demo lint
setup:
	bash scripts/setup.sh

test: setup
	$(PYTEST) --dist loadscope $(PYTEST_ARGS)

# the long checks kept out of `make test` (marker `long`: the benchmark scripts' quick runs, the demo, the SIGKILL
# resume tests, the learning test); CI runs both
test-long: setup
	$(PYTEST) --dist load -m long $(PYTEST_ARGS)

# every command block of README.md and examples/*/README.md, run shrunk (tests/docs); CI runs it after test-long
test-docs: setup
	$(PYTEST) --dist load -m docs $(PYTEST_ARGS)

demo: setup
	cd $(CURDIR) && $(dir $(PY))rmt-demo $(DEMO_ARGS)

lint: setup
	$(PY) -m ruff --version >/dev/null 2>&1 || $(PY) -m pip install -q ruff
	$(PY) -m ruff check rmt_fairseq user_dir tests benchmarks
