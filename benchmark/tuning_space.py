"""What Optuna may tune for each strategy: one declarative table.

Why a table and not code in each strategy: a fair comparison gives every strategy the same
budget over *its own key knob*, and that choice belongs to the benchmark, not to the strategy.
Keeping it here, keyed by strategy name, means a new strategy is tuned by adding one entry
(MetaLR's ``hyper_lr`` is already listed; it is used once the strategy is registered).

``lr`` is the base learning rate (``BenchmarkConfig.lr``), tuned for every strategy; the other
names are fields of the strategy's ``Params``. ``high="groups"`` means "the number of layer
groups of the model" (last-k's ``k``), resolved against the real model before the study starts.
A ``tune.params`` block in the config may change bounds or drop a dimension.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from metalr_bench.benchmark.config import ConfigError, SearchDimSpec

#: config fields (not strategy params) a trial may set
CONFIG_DIMS = ("lr",)


@dataclass(frozen=True)
class SearchDim:
    type: Literal["float", "int"]
    low: float
    high: float | Literal["groups"]
    log: bool = False

    def suggest(self, trial: Any, name: str) -> float | int:
        """Ask an Optuna trial for a value (Optuna 5: keyword-only ``log``)."""
        assert not isinstance(self.high, str), "resolve() the search space first"
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), log=self.log)

    def describe(self) -> str:
        scale = " log" if self.log else ""
        return f"{self.type}[{self.low:g}, {self.high if isinstance(self.high, str) else f'{self.high:g}'}]{scale}"


LR = SearchDim("float", 1e-5, 1e-1, log=True)

SEARCH_SPACE: dict[str, dict[str, SearchDim]] = {
    "full": {"lr": LR},
    "last_k": {"lr": LR, "k": SearchDim("int", 1, "groups")},
    "l2sp": {"lr": LR, "alpha": SearchDim("float", 1e-3, 1.0, log=True)},
    "layer_decay": {"lr": LR, "decay": SearchDim("float", 0.3, 1.0)},
    "metalr": {"lr": LR, "hyper_lr": SearchDim("float", 1e-3, 1.0, log=True)},
}


def search_space(
    strategy: str,
    n_groups: int,
    overrides: dict[str, dict[str, SearchDimSpec | None]] | None = None,
) -> dict[str, SearchDim]:
    """The resolved space of ``strategy`` for a model with ``n_groups`` layer groups.

    Raises :class:`ConfigError` for a name that is neither ``lr`` nor a strategy parameter, or
    bounds the model cannot satisfy (``k`` above the number of layer groups).
    """
    from metalr_bench.strategies.registry import get_strategy

    space = dict(SEARCH_SPACE.get(strategy, {"lr": LR}))
    fields = set(get_strategy(strategy).Params.model_fields)
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
        if name == "k" and strategy == "last_k" and high > n_groups:
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
