"""The race: `run-benchmark race`, which strategy for a new dataset at a fraction of the grid.

Holds, one concern per module: ``orchestration`` (``run_race``: per dataset the search, one
Optuna study across strategies (:mod:`..tuning.race_study`), then the confirmation of its top
strategies on seeds through the grid's runner); ``settings`` (the race's flags and their checks);
``outcome`` (a dataset's race, the answer with paired tests, the compute spent next to the plan's
price of the full grid); ``winner_model`` (the winner's model logged and registered in MLflow);
``formatting`` (the printed summary).

May import: running, planning, tuning, training, reports, tracking, models, config, strategies,
datasets; never cli or perf.
"""
