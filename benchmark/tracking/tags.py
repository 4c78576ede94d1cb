"""The tag schema of every MLflow run the suite writes, as named constants.

Why constants: the runner writes these tags, resume and the reports search by them, and the
filter examples of docs/mlflow.md quote them; a key spelt two ways (``stage`` for pre-training runs,
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
KIND_RACE = "race"  # the parent run of one `run-benchmark race` call
KIND_MODEL = "model"  # a race's winning model (an MLflow model), under the race's run
#: on a race's parent run: JSON {dataset key: what the race spent, a sentence of the answer}
RACE_COMPUTE = "race.compute"
#: the key older versions wrote on pre-training runs (read, never written)
LEGACY_STAGE = "stage"

DATASET = "dataset"  # the dataset's display name (label, fold included)
DATASET_ADAPTER = "dataset.adapter"  # the adapter that loads it (imagefolder, pneumoniamnist)
#: cross-validation: the fold (test fold index) and the name shared by all folds of a dataset
FOLD = "fold"
CV_GROUP = "cv_group"
IMAGE_SIZE = "image_size"
STRATEGY = "strategy"
STRATEGY_LABEL = "strategy_label"
SEED = "seed"
MODEL = "model"
CONFIG_HASH = "config_hash"
#: the fingerprint of the code a cell's result depends on (``benchmark.fingerprint``), also a
#: param; the report warns when one leaderboard mixes several
CODE_FINGERPRINT = "code_fingerprint"
#: the fingerprint of the code every strategy shares (loop, data, models, strategy core)
CODE_FINGERPRINT_SHARED = "code_fingerprint.shared"
TUNED = "tuned"
#: (tag and param) a tuned cell that took another strategy's tuned parameters: ``metalr`` on
#: ``discriminative``'s cells when both are in one tuned grid (its control, ``Strategy.controls``)
TUNED_FROM = "tuned_from"
#: the strategy's ``Strategy.mechanism``: the logged metric that shows its mechanism acted
#: (absent for a strategy without one, ``full``); the report's "Did each strategy act?" reads it
MECHANISM = "mechanism"
STUDY_NAME = "optuna.study_name"

#: why a run ended FAILED or KILLED (``error`` is the older key, still written for filters)
FAILURE_REASON = "failure_reason"
ERROR = "error"

#: the artifact every cell run logs: its test-set predictions (CSV: label(s), prob.<class>);
#: the report pools the folds of a cross-validation from them
PREDICTIONS_ARTIFACT = "predictions/test.csv"
#: the parent run's published reference rows (config `references:`), read by the report
REFERENCES_ARTIFACT = "references.json"

#: who runs it (liveness): host name, process id, Unix time of the last heartbeat
HOST = "run.host"
PID = "run.pid"
HEARTBEAT = "run.heartbeat"


def is_pretrain(tags: dict[str, str]) -> bool:
    """Whether a run's tags say it is a pre-training run (this version's or an older one's)."""
    return tags.get(KIND) == KIND_PRETRAIN or tags.get(LEGACY_STAGE) == KIND_PRETRAIN
