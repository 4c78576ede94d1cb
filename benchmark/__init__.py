"""The benchmark: from a config to tracked, tuned, planned runs.

Holds the doors and stages, one sub-package per concern (a newcomer finds a concept in one hop):

- ``cli`` (`run-benchmark`) and ``config`` (the typed config, the grid of cells, a cell's
  identity: ``config_hash``, study names and logged params all come from ``cell_identity``);
- ``running/``: the grid runner, resume, executors (serial, local processes, Ray), pre-flight
  checks, signals;
- ``tuning/``: Optuna studies, their search spaces and storages, dead-trial detection;
- ``planning/``: `run-benchmark plan` (counts and cost of a grid) and ``--check``;
- ``perf/``: step and throughput benchmarks, the GPU figures in one command;
- ``training/``: the one cell builder, the one training loop, metrics, checkpoints, faults,
  the pre-training stage and starting weights;
- ``tracking/``: the MLflow client with retry, the tag schema, the tracking server, liveness
  (heartbeats, owner tags, stale-run detection);
- ``models/``: the model zoo and torchvision compatibility.

May import (one way, top to bottom; import-linter checks it, see ``pyproject.toml``):
perf -> cli -> running | planning -> tuning -> training | reports -> tracking | models -> config
-> fingerprint (the code fingerprint in a cell's identity) -> strategies | datasets.
"""

__version__ = "0.1.0"
