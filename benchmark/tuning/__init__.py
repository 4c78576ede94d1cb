"""Fair tuning: one Optuna study per (dataset, strategy) on validation data.

Holds: ``studies`` (the studies, their MLflow runs, the final grid of best parameters),
``space`` (a strategy's declared search space with the config's overrides, resolved),
``storage`` (RDB and journal storages, the exact parallel trial loop) and ``stale_trials``
(dead vs live RUNNING trials).

May import: training, tracking, models, config, strategies, datasets; never running, cli or
perf (the runner calls tuning, not the other way round).
"""
