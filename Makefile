# Two entry points a new user needs; both create .venv/ on first use.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: install figures test lint report ui clean-results lock

LOCK := requirements.lock

# The environment is the lock (every package pinned, with hashes); pyproject.toml keeps the
# ranges for installing the package elsewhere. Refresh the lock after editing them:
#   uv pip compile pyproject.toml --extra test --extra slurm --extra gpu --generate-hashes \
#       --universal --python-version 3.11 -o requirements.lock
$(STAMP): pyproject.toml $(LOCK)
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet --require-hashes -r $(LOCK)
	$(VENV)/bin/pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# refresh the lock and the conda file's copy of its pins (uv from PyPI: pip install uv)
lock:
	uv pip compile pyproject.toml --extra test --extra slurm --extra gpu --generate-hashes \
		--universal --python-version 3.11 -o $(LOCK)
	$(VENV)/bin/python envs/from_lock.py

figures: $(STAMP)
	$(VENV)/bin/snakemake --cores all figures

test: $(STAMP)
	$(VENV)/bin/python -m pytest

report: $(STAMP)
	$(VENV)/bin/snakemake --cores all figures
	$(VENV)/bin/snakemake --report report.html

# The MLflow UI on the pipeline's store; experiments: #/experiments/<id>?workflowType=machine_learning
ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --workers 1 --port 5000

lint: $(STAMP)
	$(VENV)/bin/snakefmt --check Snakefile workflow/rules
	$(VENV)/bin/snakemake --lint

clean-results:
	rm -rf results/synthetic results/ablations figures/synthetic figures/ablations
	rm -rf logs/ benchmarks/rules/ mlruns/ checkpoints/ .snakemake/
