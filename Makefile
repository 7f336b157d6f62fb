# Two commands: `make run` and `make test`. Each sets up .venv by itself on a fresh machine.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=
RUN_ARGS ?=

.PHONY: setup run test test-fast bench browser-deps clean

setup: $(STAMP)

# torch: `pip install torch==2.13.0` takes the CPU build from local disk here; a GPU machine
# keeps its own torch (pyproject only asks for torch>=2.4).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Debian chromium for the browser tests (playwright drives it; no browser is ever downloaded).
browser-deps:
	@test -x /usr/bin/chromium || { \
	  echo "installing Debian chromium for the browser tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "WARNING: could not install chromium; browser tests will fail"; }

# Serves the UI at once, trains while its Training tab follows the run, then serves the trained
# model. Options pass through, e.g. make run RUN_ARGS="--port 8100 --steps 400".
run: $(STAMP)
	WANDB_MODE=offline $(PY) -m ray_jobs.cli demo $(RUN_ARGS)

# Two xdist lanes: most of the suite waits (Ray starts, HTTP, Serve deploys, subprocesses), so two
# share the 2 cores well. Tests that must not run at once share a lane group (tests/conftest.py
# lane_group, its own loadgroup scheduler); PYTEST_ARGS comes last, so PYTEST_ARGS="-n 0" runs the
# suite in one process.
TEST_LANES ?= 2
test: $(STAMP) browser-deps
	WANDB_MODE=offline $(PY) -m pytest -n $(TEST_LANES) --dist loadgroup --no-loadscope-reorder $(PYTEST_ARGS)

test-fast: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -m "not slow and not browser and not ray" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/model_speed.py

clean:
	rm -rf $(VENV) .pytest_cache runs
