# Two entry points a new user needs; both create .venv/ on first use.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: install figures test lint clean-results

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

figures: $(STAMP)
	$(VENV)/bin/snakemake --cores all figures

test: $(STAMP)
	$(VENV)/bin/python -m pytest

lint: $(STAMP)
	$(VENV)/bin/snakemake --lint

clean-results:
	rm -rf results/synthetic results/ablations figures/synthetic figures/ablations
	rm -rf logs/ benchmarks/rules/ mlruns/ checkpoints/ .snakemake/
