"""Reproducible pipeline for *On Training Implicit Models* (Geng et al., NeurIPS 2021).

Rooms, bottom layer first; imports run downward only (the layer order is written down
and enforced in ``tests/test_layers.py``, imports inside functions included):

    deq/          the maths: solvers, gradient estimators (implicit, UPG, NPG), spectral
                  tools, Jacobian regularization; knows nothing of files or tracking
                  (deq/config.py: their configurations and names, without torch)
    io.py, signals.py, progress.py, memory.py, environment.py
                  small helpers: atomic writes and the params hash, SIGTERM, progress
                  lines, tensor memory, what a run ran on
    models/       the synthetic layer, MDEQ (tiny, large, small), the DEQ-Transformer,
                  IGNN; they know nothing of training loops
    data/         dataset download, verification and export
    tracking.py   the one module that talks to MLflow, and the metric names
    experiments/  the synthetic study, and the one training loop with its tasks
    figures/      plots and tables, reading only results/; paper values in reference.yaml
    config.py     params.yaml: schema validation and scale resolution
    cli.py        ``python -m pipeline <command>``, one command per Snakemake rule
"""
__version__ = "0.1.0"
