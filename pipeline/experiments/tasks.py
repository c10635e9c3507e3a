"""The task registry: what the shared training loop needs to know about one kind of data.

A task builds its model from a run's ``model:`` block, yields batches for
(split, epoch, rank, world size), computes the loss and metrics of a batch, and
evaluates a split; it names its primary metric. The loop (:mod:`.train`) knows
nothing else of the study. The tasks live in their study's module and depend only
downward (on :mod:`.sampling`, the models and the data layer); this module lists them:
``image`` and ``imagefolder`` (MDEQ, :mod:`.vision_tasks`), ``graph`` and ``node``
(IGNN, :mod:`.graph_tasks`), ``lm`` (the DEQ-Transformer, :mod:`.lm_tasks`). A task
with a ``repeats(data, seed)`` static method (folds, seeds) is trained once per unit
by ``python -m pipeline train-repeats`` (:mod:`.repeats`).

The names need no torch (params.yaml's validation checks them in the Snakefile's process);
the task modules, which do, are imported by the first :func:`get_task`.

>>> TASK_NAMES
('graph', 'image', 'imagefolder', 'lm', 'node')
>>> get_task("text")
Traceback (most recent call last):
...
ValueError: unknown task 'text'; valid tasks: ['graph', 'image', 'imagefolder', 'lm', 'node']
"""
from __future__ import annotations

TASK_NAMES = ("graph", "image", "imagefolder", "lm", "node")  # a run's `task:`

# The task classes by name: filled by the first get_task (tests add their own).
TASKS: dict[str, type] = {}


def check_task(name: str) -> None:
    """Refuses a name that is not a task, listing the valid ones; imports no task module."""
    if name not in TASK_NAMES and name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {sorted({*TASK_NAMES, *TASKS})}")


def get_task(name: str) -> type:
    """The task class registered as ``name``; an unknown name lists the valid ones."""
    check_task(name)
    if name not in TASKS:
        from pipeline.experiments.graph_tasks import GraphTask, NodeTask
        from pipeline.experiments.lm_tasks import LMTask
        from pipeline.experiments.vision_tasks import ImageFolderTask, ImageTask
        TASKS.update({cls.name: cls for cls in
                      (ImageTask, ImageFolderTask, GraphTask, NodeTask, LMTask)})
    return TASKS[name]
