"""The typed benchmark config: YAML file and/or CLI flags (CLI overrides file).

Holds, one concern per module: ``schema`` (the pydantic models: ``BenchmarkConfig``,
``DatasetSpec``, ``StrategySpec``, ``ModelSpec``, ``PretrainSpec``, ``TuneSpec``,
``ReferenceSpec``, and their validation); ``identity`` (the grid's ``Cell`` and a cell's identity:
``cell_identity`` -> ``config_hash``, the Optuna study names and the logged params, so they
cannot disagree); ``loading`` (YAML, CLI overrides merged on top, ``references:`` files:
``load_config``, ``validate_config``); ``errors`` (``ConfigError``: one line naming the field and
the fix). Every public name is re-exported here, so ``from metalr_bench.benchmark.config import
BenchmarkConfig`` keeps working.

May import: pydantic, yaml, ``metalr_bench.benchmark.fingerprint``, and, inside validators only
(discovery imports torch, which `--help` must not), the zoo (``benchmark.models``) and the
strategy and dataset registries.
"""

from metalr_bench.benchmark.config.errors import ConfigError
from metalr_bench.benchmark.config.identity import (
    CELL_OVERRIDABLE,
    CODE_VERSION,
    RESULT_FIELDS,
    Cell,
    stable_hash,
    tuned_controls,
)
from metalr_bench.benchmark.config.loading import deep_merge, load_config, validate_config
from metalr_bench.benchmark.config.schema import (
    BenchmarkConfig,
    DatasetSpec,
    ModelSpec,
    PretrainSpec,
    ReferenceSpec,
    SearchDimSpec,
    StrategySpec,
    TuneSpec,
)

__all__ = [
    "CELL_OVERRIDABLE", "CODE_VERSION", "RESULT_FIELDS", "BenchmarkConfig", "Cell",
    "ConfigError", "DatasetSpec", "ModelSpec", "PretrainSpec", "ReferenceSpec", "SearchDimSpec",
    "StrategySpec", "TuneSpec", "deep_merge", "load_config", "stable_hash", "tuned_controls",
    "validate_config",
]
