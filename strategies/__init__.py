"""Fine-tuning strategies behind one small interface (see :mod:`.base`)."""

from metalr_bench.strategies.base import StepContext, Strategy, TrainSettings
from metalr_bench.strategies.registry import (
    DEFAULT_STRATEGIES,
    available_strategies,
    get_strategy,
)

__all__ = [
    "DEFAULT_STRATEGIES",
    "StepContext",
    "Strategy",
    "TrainSettings",
    "available_strategies",
    "get_strategy",
]
