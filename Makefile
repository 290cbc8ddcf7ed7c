# Set-up is two commands: `make pipeline` and `make test`. Both create .venv when missing.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export ORT_DISABLE_TELEMETRY := 1

.PHONY: install pipeline test bench clean

$(PY):
	python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Reinstall only when the dependency list changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# A .venv copied from another checkout keeps that checkout's paths (its scripts, `activate`), and so
# would run that checkout's code: refuse it.
install: $(STAMP)
	@head -1 $(VENV)/bin/dvc | grep -qxF '#!$(CURDIR)/$(PY)' || { echo "$(VENV) was made in another folder \
	($$(head -1 $(VENV)/bin/dvc)) and would run its code: rm -rf $(VENV) && make install" >&2; exit 1; }
	bash examples/install.sh

pipeline: install
	$(VENV)/bin/dvc repro

# Workers, one per core up to 4: the end-to-end tests spend much of their time starting stages (imports,
# subprocesses), so two workers on 2 cores took the suite from 15-17 minutes to 10.
test: install
	$(PY) -m pytest -q -n auto --maxprocesses 4

bench: install
	$(PY) benchmarks/ingest_throughput.py
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf data models reports/*.json reports/plots .dvc/tmp
