"""The race: `run-benchmark race`, which strategy for a new dataset at a fraction of the grid.

Holds: ``race`` (per dataset: the search, one Optuna study across strategies
(:mod:`..tuning.race`); the confirmation of its top strategies on seeds through the grid's runner;
the answer with paired tests; the compute spent next to the plan's price of the full grid; the
winner's model logged and registered in MLflow).

May import: running, planning, tuning, training, reports, tracking, models, config, strategies,
datasets; never cli or perf.
"""
