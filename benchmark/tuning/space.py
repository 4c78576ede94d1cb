"""What Optuna tunes for a strategy: its declared space with the config's overrides, resolved.

Each strategy declares its space next to its ``Params`` (``Strategy.search_space``, see
:mod:`metalr_bench.strategies.core.space`); nothing here lists strategies. A ``tune.params``
block in the config may change bounds, add a dimension or drop one; ``high="groups"`` is
resolved against the real model's number of layer groups.

Every point of the resolved space must be a configuration the strategy accepts, or trials fail
at construction (MetaLR refuses an lr whose initial rates fall outside its [lr_min, lr_max]).
So the strategy's own hook, ``Strategy.constrain_space``, narrows the space given the params
the config fixes; a ``tune.params`` bound the hook had to narrow is refused, naming it, rather
than silently changed.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Any

from metalr_bench.benchmark.config import ConfigError, SearchDimSpec
from metalr_bench.strategies.core.base import SpaceError
from metalr_bench.strategies.core.registry import get_strategy
from metalr_bench.strategies.core.space import SearchDim

#: config fields (not strategy params) a trial may set
CONFIG_DIMS = ("lr",)


def search_space(
    strategy: str,
    n_groups: int,
    overrides: dict[str, dict[str, SearchDimSpec | None]] | None = None,
    fixed: dict[str, Any] | None = None,
) -> dict[str, SearchDim]:
    """The resolved space of ``strategy`` for a model with ``n_groups`` layer groups.

    ``fixed``: the strategy's params as the config gives them (the searched ones are ignored),
    and optionally ``lr``, the config's base LR, used when ``lr`` is not searched; without it
    the strategy's defaults. The space is narrowed by ``Strategy.constrain_space`` so that every
    point is a configuration the strategy accepts with those params.

    Raises :class:`ConfigError` for a name that is neither ``lr`` nor a strategy parameter,
    bounds the model cannot satisfy (``k`` above the number of layer groups), a ``tune.params``
    bound that lets in configurations the strategy refuses, or a space with none it accepts.
    """
    cls = get_strategy(strategy)
    space = dict(cls.search_space)
    fields = set(cls.Params.model_fields)
    given_bounds: dict[str, set[str]] = {}  # what tune.params set: name -> {"low", "high"}
    for name, spec in ((overrides or {}).get(strategy) or {}).items():
        where = f"tune.params.{strategy}.{name}"
        if name not in fields and name not in CONFIG_DIMS:
            allowed = ", ".join(sorted(fields | set(CONFIG_DIMS)))
            raise ConfigError(f"`{where}`: {strategy!r} has no parameter {name!r}; tunable: {allowed}")
        if spec is None:
            space.pop(name, None)
            continue
        given = spec.model_dump(exclude_none=True)
        given_bounds[name] = {"low", "high"} & given.keys()
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
    return _constrain(cls, strategy, resolved, fixed, given_bounds)


def _constrain(
    cls: Any, strategy: str, space: dict[str, SearchDim], fixed: dict[str, Any] | None,
    given_bounds: dict[str, set[str]],
) -> dict[str, SearchDim]:
    """Apply the strategy's ``constrain_space``; refuse a ``tune.params`` bound it narrowed."""
    # searched names are not fixed; a list (several grid values) is refused by the caller
    untuned = {k: v for k, v in (fixed or {}).items()
               if k not in space and not isinstance(v, list)}
    try:
        narrowed = cls.constrain_space(dict(space), untuned)
    except SpaceError as exc:
        where = (f"`tune.params.{strategy}.{exc.name}`" if given_bounds.get(exc.name)
                 else f"strategy {strategy!r} cannot be tuned with its fixed params")
        raise ConfigError(f"{where}: {exc}") from None
    if set(narrowed) != set(space):
        raise ConfigError(f"strategy {strategy!r}: constrain_space changed the searched names "
                          f"{sorted(space)} to {sorted(narrowed)}; it may only narrow ranges")
    doc = (inspect.getdoc(cls.constrain_space) or "").split("\n\n")[0].replace("\n", " ")
    for name, dim in narrowed.items():
        old = space[name]
        where = f"tune.params.{strategy}.{name}"
        if dim.low < old.low or dim.high > old.high:
            raise ConfigError(f"strategy {strategy!r}: constrain_space widened `{name}` from "
                              f"{old.describe()} to {dim.describe()}; it may only narrow it")
        for side in sorted(given_bounds.get(name, set())):
            if getattr(dim, side) != getattr(old, side):
                raise ConfigError(
                    f"`{where}`: {side}={getattr(old, side):g} lets in configurations "
                    f"{strategy!r} refuses with its fixed params; the range it accepts here is "
                    f"[{dim.low:g}, {dim.high:g}]: set {side} inside it, or drop it"
                    + (f" ({cls.__name__}.constrain_space: {doc})" if doc else "")
                )
        if not dim.low < dim.high and not (dim.type == "int" and dim.low == dim.high):
            raise ConfigError(f"`{where}`: nothing is left of {old.describe()} once narrowed "
                              f"to what {strategy!r} accepts ({dim.describe()})")
    return narrowed


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
