"""What Optuna tunes for a strategy: its declared space with the config's overrides, resolved.

Each strategy declares its space next to its ``Params`` (``Strategy.search_space``, see
:mod:`metalr_bench.strategies.core.space`); nothing here lists strategies. A ``tune.params``
block in the config may change bounds, add a dimension or drop one; ``high="groups"`` is
resolved against the real model's number of layer groups.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from metalr_bench.benchmark.config import ConfigError, SearchDimSpec
from metalr_bench.strategies.core.registry import get_strategy
from metalr_bench.strategies.core.space import SearchDim

#: config fields (not strategy params) a trial may set
CONFIG_DIMS = ("lr",)


def search_space(
    strategy: str,
    n_groups: int,
    overrides: dict[str, dict[str, SearchDimSpec | None]] | None = None,
) -> dict[str, SearchDim]:
    """The resolved space of ``strategy`` for a model with ``n_groups`` layer groups.

    Raises :class:`ConfigError` for a name that is neither ``lr`` nor a strategy parameter, or
    bounds the model cannot satisfy (``k`` above the number of layer groups).
    """
    cls = get_strategy(strategy)
    space = dict(cls.search_space)
    fields = set(cls.Params.model_fields)
    for name, spec in ((overrides or {}).get(strategy) or {}).items():
        where = f"tune.params.{strategy}.{name}"
        if name not in fields and name not in CONFIG_DIMS:
            allowed = ", ".join(sorted(fields | set(CONFIG_DIMS)))
            raise ConfigError(f"`{where}`: {strategy!r} has no parameter {name!r}; tunable: {allowed}")
        if spec is None:
            space.pop(name, None)
            continue
        given = spec.model_dump(exclude_none=True)
        if name in space:
            space[name] = replace(space[name], **given)
        elif {"low", "high"} <= given.keys():
            space[name] = SearchDim(given.get("type", "float"), given["low"], given["high"],
                                    given.get("log", False))
        else:
            raise ConfigError(f"`{where}`: a new search dimension needs `low` and `high`")
    resolved = {}
    for name, dim in space.items():
        where = f"tune.params.{strategy}.{name}"
        high = n_groups if dim.high == "groups" else dim.high
        groups_bound = cls.search_space.get(name, dim).high == "groups"
        if groups_bound and high > n_groups:
            raise ConfigError(
                f"`{where}`: high={high:g} but the model has only {n_groups} layer groups; "
                f"use high <= {n_groups}"
            )
        if not dim.low < high and not (dim.type == "int" and dim.low == high):
            raise ConfigError(f"`{where}`: low={dim.low:g} must be below high={high:g}")
        if dim.log and dim.low <= 0:
            raise ConfigError(f"`{where}`: a log-scale dimension needs low > 0 (got {dim.low:g})")
        resolved[name] = replace(dim, high=high)
    return resolved


def suggest(trial: Any, space: dict[str, SearchDim]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sample one point: ``(strategy params, config overrides)``."""
    params: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    for name, dim in space.items():
        (overrides if name in CONFIG_DIMS else params)[name] = dim.suggest(trial, name)
    return params, overrides


def split_params(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a best-trial ``params`` dict the same way :func:`suggest` does."""
    params = {k: v for k, v in values.items() if k not in CONFIG_DIMS}
    return params, {k: v for k, v in values.items() if k in CONFIG_DIMS}
