"""What every strategy shares.

Holds: ``base`` (the ``Strategy`` interface, ``StepContext``, ``TrainSettings``, ``register``),
``layers`` (the one layer grouping of a model, input to output, read from the ``LayerPlan`` its
builder attached), ``space`` (``SearchDim``: a
strategy's search space), ``registry`` (discovery by package scan and entry points),
``hypergrad`` (MetaLR's exact first-order hyper-gradient), ``lr_curves`` (its LR figure) and
``optim`` (the optimizer registry: every optimizer a config may name, defined once).

May import: torch, pydantic, matplotlib; never the benchmark, datasets, MLflow or Optuna.
"""
