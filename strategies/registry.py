"""Look up strategies by name; importing this module registers every built-in strategy."""

from __future__ import annotations

import importlib

from metalr_bench.strategies.base import STRATEGIES, Strategy

_BUILTIN = ("full", "last_k", "l2sp", "layer_decay", "metalr")
for _mod in _BUILTIN:
    try:
        importlib.import_module(f"metalr_bench.strategies.{_mod}")
    except ModuleNotFoundError as exc:  # a strategy module not written yet
        if exc.name != f"metalr_bench.strategies.{_mod}":
            raise

#: the strategies the quick benchmark compares when the config names none
DEFAULT_STRATEGIES = [n for n in ("full", "last_k", "l2sp", "layer_decay", "metalr")
                      if n in STRATEGIES]


def available_strategies() -> list[str]:
    return sorted(STRATEGIES)


def get_strategy(name: str) -> type[Strategy]:
    if name not in STRATEGIES:
        raise KeyError(
            f"unknown strategy {name!r}; available: {', '.join(available_strategies())}"
        )
    return STRATEGIES[name]
