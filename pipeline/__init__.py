"""Reproducible pipeline for *On Training Implicit Models* (Geng et al., NeurIPS 2021).

Rooms:
    deq/          solvers, gradient estimators, spectral tools (pure maths)
    models/       synthetic spectral-normalised layer, MDEQ-Tiny
    experiments/  studies that compose models and estimators
    data/         dataset download, verification and export
    figures/      plots and tables, reading only results/
    tracking.py   the one module that talks to MLflow
    config.py     params.yaml schema validation and scale resolution
    cli.py        ``python -m pipeline <command>``
"""
__version__ = "0.1.0"
