# Two entry points a new user needs; both create .venv/ on first use.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: install figures test lint report ui clean-results

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[test,slurm]"
	touch $(STAMP)

install: $(STAMP)

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
	$(VENV)/bin/snakemake --lint

clean-results:
	rm -rf results/synthetic results/ablations figures/synthetic figures/ablations
	rm -rf logs/ benchmarks/rules/ mlruns/ checkpoints/ .snakemake/
