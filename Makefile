# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv from requirements.lock (reused while the lock is unchanged), then run.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DAGSTER_HOME ?= $(CURDIR)/dagster_home
export QWEN_EDIT_ROOT ?= $(CURDIR)
export TOKENIZERS_PARALLELISM := false
# exported: the links the trainer and the assets write (MLflow run pages, the Dagster run in an MLflow
# run's description) point where `make ui` / `make mlflow-ui` serve
export DAGSTER_PORT ?= 3000
export MLFLOW_PORT ?= 5000
# the UIs listen on this machine only; set DAGSTER_HOST / MLFLOW_HOST (e.g. 0.0.0.0) to serve a network on purpose
export DAGSTER_HOST ?= 127.0.0.1
export MLFLOW_HOST ?= 127.0.0.1
# `make demo`: Dagster's INFO lines (not DEBUG), without its notes on the beta/preview APIs it uses internally
DEMO_RUN_CONFIG := {"loggers": {"console": {"config": {"log_level": "INFO"}}}}

# `dagster dev` started in the background (`make ui &`, nohup, CI) inherits SIGINT/SIGTERM
# ignored and then cannot be stopped; reset both before exec so Ctrl-C and kill work everywhere.
WITH_SIGNALS := $(PY) -c 'import os, signal, sys; [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGTERM)]; os.execv(sys.argv[1], sys.argv[1:])'

.PHONY: setup system-packages demo test test-integration ui mlflow-ui clean-demo

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e . 2>&1 | { grep -v "^WARNING: Location" || true; }
	touch $(STAMP)

setup: $(STAMP)

## system-packages: Debian's chromium, chromium-driver, postgresql for the integration tests (installed when missing)
system-packages:
	bash scripts/system_packages.sh

## demo: tiny model + demo data, then materialise every asset with Dagster; prints where results are
demo: setup
	@$(PY) -m qwen_edit_assets.instance_check
	$(PY) -m trainer.cli demo-setup
	$(PY) scripts/dagster_quiet.py asset materialize -m qwen_edit_assets.definitions --select '*' --config-json '$(DEMO_RUN_CONFIG)'
	$(PY) -m qwen_edit_assets.demo_summary

## test: the whole suite (CPU only, tiny model) on TEST_WORKERS pytest-xdist workers (each module on one worker,
## the integration tests together on one; TEST_WORKERS=0 runs it in this process, integration tests last)
# 2: CI's machine has two CPU cores; on one like it the suite ran green in 864 s (CI's one-process run: 1628 s)
# (tests/conftest.py's pytest_xdist_make_scheduler keeps each module, and the integration tests, on one worker)
TEST_WORKERS ?= 2
test: setup system-packages
	$(PY) -m pytest -q -p no:cacheprovider $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup)

## test-integration: only the integration tests (real Dagster servers, Chromium, PostgreSQL, MLflow server)
test-integration: setup system-packages
	$(PY) -m pytest -q -p no:cacheprovider -m integration tests/integration

## ui: Dagster webserver + daemon on $(DAGSTER_HOST):$(DAGSTER_PORT)
# (first: an instance on PostgreSQL that is down or refuses the login is one line naming it and the fix)
ui: setup
	@$(PY) -m qwen_edit_assets.instance_check
	exec $(WITH_SIGNALS) $(VENV)/bin/dagster dev -m qwen_edit_assets.definitions --host $(DAGSTER_HOST) --port $(DAGSTER_PORT)

## mlflow-ui: the MLflow UI over the embedded store on $(MLFLOW_HOST):$(MLFLOW_PORT)
mlflow-ui: setup
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --host $(MLFLOW_HOST) --port $(MLFLOW_PORT)

clean-demo:
	rm -rf demo outputs cache mlruns
	find dagster_home -mindepth 1 ! -name dagster.yaml ! -name dagster.postgres.yaml -exec rm -rf {} +
