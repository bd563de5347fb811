# The overnight package's commands (see README.md). Each works on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
USERS ?= 1000
SEED ?= 42
MARKET ?=
DATE ?=
JOB ?=
SESSION ?=
PYTEST_ARGS ?=
PYTEST_WORKERS ?= 2
WITH_ENV := set -a && . .local/env.sh && set +a &&

.PHONY: install env browser migrate airflow-setup seed demo test test-slow run replay invalidate airflow stop lint bench

# requirements-dev.txt: the lock of production's requirements.txt plus the development and test tools;
# the package (include/pyproject.toml) is installed editable, as in the image.
$(VENV)/.installed: requirements.txt requirements-dev.txt include/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check uv==0.13.9
	@$(VENV)/bin/uv pip install --python $(PY) -q --compile-bytecode -r requirements-dev.txt
	@$(VENV)/bin/uv pip install --python $(PY) -q --no-deps -e include
	@touch $@

install: $(VENV)/.installed  ## create .venv: the locked requirements (requirements-dev.txt) and the package

env: install  ## start embedded Postgres/Redis unless connections are given; write .local/env.sh
	@$(PY) -m compileall -q include dags plugins >/dev/null || true
	@$(PY) -m overnight.dev.devenv up

migrate: env  ## apply the application's migrations
	@$(WITH_ENV) $(PY) -m overnight.adapters.migrate

airflow-setup: env  ## Airflow metadata database, pools, dev logins
	@$(WITH_ENV) $(PY) -m overnight.dev.airflow_setup

seed: migrate  ## seed USERS synthetic users (SEED sets the random seed)
	@$(WITH_ENV) $(PY) -m overnight.dev.seed --users $(USERS) --seed $(SEED)

demo: seed airflow-setup  ## the main job from nothing: seed 1,000 users, run every market once, print a table
	@$(WITH_ENV) $(PY) -m overnight.dev.cli demo

run: migrate airflow-setup  ## run MARKET's DAG once in-process for DATE (default: its next session)
	@test -n "$(MARKET)" || { echo "usage: make run MARKET=XNYS [DATE=YYYY-MM-DD]"; exit 2; }
	@$(WITH_ENV) $(PY) -m overnight.dev.cli run --market "$(MARKET)" $(if $(DATE),--date "$(DATE)")

# USER is also the login's name in the environment: only one given on the command line is a user id.
replay: migrate  ## recompute USER's calculation from the audit trail alone: identical, or each differing field
	@test "$(origin USER)" = "command line" || { echo "usage: make replay USER=<user id> [JOB=<job run id> | SESSION=YYYY-MM-DD MARKET=XNYS]  (default: the user's latest calculation)"; exit 2; }
	@$(WITH_ENV) $(PY) -m overnight.night.replay --user "$(USER)" $(if $(JOB),--job "$(JOB)") $(if $(SESSION),--session "$(SESSION)") $(if $(MARKET),--market "$(MARKET)")

# USER is also the login's name in the environment: only one given on the command line is a user id.
invalidate: migrate  ## drop USER's cached advice (RECALCULATE=1: and recalculate them; needs make airflow) or ALL=1's
	@if [ -n "$(ALL)" ]; then $(WITH_ENV) $(PY) -m overnight.night.invalidation --all; \
	elif [ "$(origin USER)" = "command line" ]; then $(WITH_ENV) $(PY) -m overnight.night.invalidation --user "$(USER)" $(if $(RECALCULATE),--recalculate); \
	else echo "usage: make invalidate USER=<user id> [RECALCULATE=1] | ALL=1  (docs/design.md: invalidation)"; exit 2; fi

EXECUTOR ?= local
BATCH ?= 10000
bench: env  ## the benchmark on fresh databases: USERS=N [EXECUTOR=celery] [BATCH=users per task]
	@$(WITH_ENV) $(PY) -m overnight.dev.bench --users $(USERS) --executor $(EXECUTOR) --batch-size $(BATCH)

browser:  ## Chromium for the browser test of the Overnight page (apt-get as root; otherwise says what to run)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Chromium for the browser test (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "warning: no Chromium: the browser test will skip (fail in CI); as root: apt-get update && apt-get install -y chromium"; fi

# PYTEST_WORKERS: pytest-xdist processes (0: one process); each has databases and a Redis database of its own.
# Two tiers: `make test` runs every test but those marked `slow` (the benchmark on both executors, the live
# scheduler's runs, kills and restarts: minutes each), `make test-slow` runs those; CI (.ci/run) runs both.
PYTEST_RUN := $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: env browser  ## the test suite but its slow tier, on fresh databases of its own (PYTEST_WORKERS=2 processes)
	@$(WITH_ENV) $(PYTEST_RUN) -m "not slow" $(PYTEST_ARGS)

test-slow: env  ## the slow tier: the tests marked slow (benchmark executors, live scheduler, kills, restarts)
	@$(WITH_ENV) $(PYTEST_RUN) -m slow $(PYTEST_ARGS)

airflow: migrate airflow-setup  ## api-server on 127.0.0.1:8080 (OVERNIGHT_API_HOST/PORT), scheduler, dag-processor, triggerer; restarted when settings change (stop: make stop)
	@$(WITH_ENV) $(PY) -m overnight.dev.services start

stop:  ## stop what the make targets started (Airflow, embedded servers)
	@if [ -f .local/env.sh ]; then $(WITH_ENV) $(PY) -m overnight.dev.services stop; fi
	@if [ -x $(PY) ]; then $(PY) -m overnight.dev.devenv down; fi

lint: install
	@$(VENV)/bin/ruff check . && $(VENV)/bin/mypy include/overnight && $(VENV)/bin/lint-imports
