"""Studies that compose models, solvers and estimators; each has a thin CLI ``main()``.

    synthetic.py      the synthetic study for one L_h (appendix §4.1, §4.4)
    train.py          the one training loop, :func:`~.train.train`, for every training
                      study; around it train_config.py (the run's keys), optim.py, step.py
                      (one step, the divergence rules), checkpoint.py, results.py,
                      diagnostics.py (gradient cosine, norms, spectral radii) and
                      distributed.py (DDP under torchrun)
    tasks.py          the task registry: what the loop knows of one kind of data, from
                      vision_tasks.py, graph_tasks.py and lm_tasks.py (sampling.py: batch order)
    train_job.py      ``python -m pipeline train``: one run, from the command line to results/
    repeats.py        ``python -m pipeline train-repeats``: the folds or seeds of one run
"""
