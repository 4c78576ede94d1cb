"""Fine-tuning strategies behind one small interface, one module each.

Holds: one module per strategy (``run-benchmark list`` lists them: the quick benchmark's
``full``, ``last_k``, ``l2sp``, ``layer_decay``, ``metalr``, ``discriminative`` (its control),
and the literature's ``lp_ft``, ``surgical``, ``auto_rgn``, ``bss``, ``delta``, ``hd``,
``metalr_public``, ``linear_probe``; any module dropped in here is one more), and ``core/``:
the interface (:mod:`.core.base`), the layer
grouping every layer-wise method shares (:mod:`.core.layers`), search-space declarations
(:mod:`.core.space`), discovery (:mod:`.core.registry`), the shared linear probe
(:mod:`.core.probe`), the regularisers' penalty share (:mod:`.core.penalty`) and MetaLR's maths
(:mod:`.core.hypergrad`, :mod:`.core.lr_curves`).

May import: torch, pydantic, matplotlib; never the benchmark, the datasets, MLflow or Optuna
(checked by import-linter), so a strategy can be read, tested and reused on its own.
"""

from metalr_bench.strategies.core.base import StepContext, Strategy, TrainSettings, register
from metalr_bench.strategies.core.registry import (
    available_strategies,
    default_strategies,
    get_strategy,
)

__all__ = [
    "StepContext",
    "Strategy",
    "TrainSettings",
    "available_strategies",
    "default_strategies",
    "get_strategy",
    "register",
]
