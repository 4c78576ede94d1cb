"""The tag schema of every MLflow run the suite writes, as named constants.

Why constants: the runner writes these tags, resume and the reports search by them, and the
README's filter examples quote them; a key spelt two ways (``stage`` for pre-training runs,
``kind`` elsewhere, as it once was) silently splits the runs a filter finds. Every run has a
``kind``; the filter ``tags.kind = 'cell'`` selects the grid's result runs.
"""

from __future__ import annotations

#: what a run is: one of the ``KIND_*`` values
KIND = "kind"
KIND_BENCHMARK = "benchmark"  # the parent run of one `run-benchmark` call
KIND_CELL = "cell"  # one (dataset, strategy, params, seed) of the grid
KIND_STUDY = "study"  # one Optuna study (dataset, strategy)
KIND_TRIAL = "trial"  # one Optuna trial, under its study run
KIND_PRETRAIN = "pretrain"  # the pre-training stage
#: the key older versions wrote on pre-training runs (read, never written)
LEGACY_STAGE = "stage"

DATASET = "dataset"
IMAGE_SIZE = "image_size"
STRATEGY = "strategy"
STRATEGY_LABEL = "strategy_label"
SEED = "seed"
MODEL = "model"
CONFIG_HASH = "config_hash"
TUNED = "tuned"
STUDY_NAME = "optuna.study_name"

#: why a run ended FAILED or KILLED (``error`` is the older key, still written for filters)
FAILURE_REASON = "failure_reason"
ERROR = "error"

#: who runs it (liveness): host name, process id, Unix time of the last heartbeat
HOST = "run.host"
PID = "run.pid"
HEARTBEAT = "run.heartbeat"


def is_pretrain(tags: dict[str, str]) -> bool:
    """Whether a run's tags say it is a pre-training run (this version's or an older one's)."""
    return tags.get(KIND) == KIND_PRETRAIN or tags.get(LEGACY_STAGE) == KIND_PRETRAIN
