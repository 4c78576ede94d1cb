"""Running a grid: what `run-benchmark` does after the config is read.

Holds: ``runner`` (a parent MLflow run per call, a child run per cell, the leaderboard),
``resume`` (skip FINISHED cells, resume checkpoints, leave live runs alone), ``executors``
(serial, local processes, Ray: *where* a cell runs; they receive the function that runs it),
``preflight`` (every input checked before a run exists) and ``signals`` (SIGTERM as Ctrl-C).

May import: tuning, training, tracking, models, config, strategies, datasets, and reports (the
report after a grid); never cli or perf.
"""
